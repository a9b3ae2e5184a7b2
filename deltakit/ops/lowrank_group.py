"""Low-rank shares of several deltas, each on its own activation rows, in one compiled call.

A mixed-delta batch adds, for every row t using delta p, ``(x_t Aₚᵀ) Bₚ`` to a linear layer's output,
with ``Aₚ`` (rank, in) and ``Bₚ`` (rank, out) the delta's factors in the order they are applied. While
decoding there are a few rows per delta and the cost is reading the factors: :class:`LowRankGroup` keeps
them at their stored width (fp16 or bf16 factors stay 16-bit, half the bytes of an fp32 copy) and the
kernel (``deltakit_low_rank_multi`` in ``lowrank_native.c``) widens them in registers, with threads
splitting rank components and output columns, never a sum. Group-quantized factors of up to 4 bits (the
codecs' default) stay 4-bit codes (:meth:`GroupFactors.prepare_quantized`): about an eighth of the bytes
of their fp32 dequantized copy, decoded in registers to that copy's exact values. Each part has its own
kind, so deltas stored at different widths share one call. Each output element's arithmetic is fixed
(fused multiply-adds in a set order, documented in ``lowrank_native.c``),
so the bits do not depend on the thread count, on which rows and deltas share the call, or on whether a
quantized factor is read as codes or as its dequantized fp32 copy. CPU only, and only when the compiled
library is there (:func:`available`); callers keep a torch path otherwise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from deltakit.ops.intpack import unpack_codes
from deltakit.ops.quant import QuantizedTensor, layout_problem
from deltakit.ops.signmm import native_library

#: factor (and activation) dtype -> the kernel's kind code
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: the kernel's kind code of group-quantized factors kept as 4-bit codes
QUANTIZED_KIND = 3
#: values per chunk of the quantized layout: a chunk's codes fill 8 bytes, its values share one scale
CHUNK = 16
#: output columns per tile of the second factor's stored layout (TILE_COLS in lowrank_native.c)
TILE_COLS = 32


def available() -> bool:
    """Whether the compiled kernel can be used (the library built, not disabled by DELTAKIT_NATIVE=0)."""
    return native_library() is not None


def stored_dtype(*factors: torch.Tensor) -> torch.dtype:
    """The dtype the kernel reads the factors in: theirs when all share one it knows, else fp32."""
    dtypes = {f.dtype for f in factors}
    if len(dtypes) == 1 and next(iter(dtypes)) in KINDS:
        return next(iter(dtypes))
    return torch.float32


def tile_columns(second: torch.Tensor) -> torch.Tensor:
    """``B`` (rank, out) in the kernel's column-tile layout -> a 1-D copy of its rank·out values.

    Tile t holds columns ``32 t .. 32 t + w - 1`` (w = 32, the last tile narrower) as a (rank, w)
    row-major block at element ``32 t · rank``, so the kernel reads each tile as one contiguous run.
    """
    rank, out = second.shape
    full = out - out % TILE_COLS
    tiles = second[:, :full].reshape(rank, full // TILE_COLS, TILE_COLS).transpose(0, 1)  # (t, rank, 32)
    return torch.cat([tiles.reshape(-1), second[:, full:].reshape(-1)])


def check_rows_pair(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    """Refuse (ValueError naming ``what``) anything but contiguous CPU activations x (N, in) and output
    y (N, out) of one dtype of :data:`KINDS`: what the compiled calls index them as."""
    if (
        x.dtype != y.dtype
        or x.dtype not in KINDS
        or x.device.type != "cpu"
        or y.device.type != "cpu"
        or not (x.is_contiguous() and y.is_contiguous())
    ):
        raise ValueError(
            f"{what} wants contiguous CPU activations and output of one dtype "
            f"({', '.join(sorted(map(str, KINDS)))}), got {x.dtype} and {y.dtype}"
        )
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"activations {list(x.shape)} and output {list(y.shape)} are not (N, in), (N, out)")


def trusted_rows(x: torch.Tensor, y: torch.Tensor, features: tuple[int, int], max_row: int, what: str) -> int:
    """The rows of x (..., in) and y (..., out) for a trusted call (the caller has checked everything but
    this): ValueError naming ``what`` unless their feature sizes are ``features`` (in, out), they hold
    the same rows and those reach ``max_row``. With no input features the rows are the output's."""
    in_features, out_features = features
    rows = x.numel() // in_features if in_features else y.numel() // max(out_features, 1)  # y empty at 0
    if (
        x.shape[-1] != in_features
        or y.shape[-1] != out_features
        or rows <= max_row
        or y.numel() != rows * out_features
    ):
        raise ValueError(
            f"{what} of ({in_features} -> {out_features}, rows up to {max_row}) "
            f"got activations {list(x.shape)}, output {list(y.shape)}"
        )
    return rows


@dataclass(frozen=True)
class GroupFactors:
    """One delta's factors for one layer, ready for the kernel: A (rank, in) and B (rank, out).

    Float kinds (:data:`KINDS`): ``first`` is A contiguous and ``second`` B in column tiles
    (:func:`tile_columns`). :data:`QUANTIZED_KIND`: both are int64 descriptors (8,) of the code layouts in
    ``keep`` (:meth:`prepare_quantized`). All CPU tensors; ``keep`` holds every tensor the kernel reads.
    """

    first: torch.Tensor
    second: torch.Tensor
    in_features: int
    out_features: int
    rank: int
    kind: int
    keep: tuple[torch.Tensor, ...]

    @classmethod
    def prepare(cls, first: torch.Tensor, second: torch.Tensor) -> GroupFactors:
        """From A (rank, in) and B (rank, out) of one dtype in :data:`KINDS` (not mutated; copied)."""
        if first.dim() != 2 or second.dim() != 2 or first.shape[0] != second.shape[0]:
            raise ValueError(f"factors {list(first.shape)} and {list(second.shape)} do not share a rank")
        if first.dtype != second.dtype or first.dtype not in KINDS:
            raise ValueError(
                f"factor dtypes {first.dtype}, {second.dtype}: want one of {sorted(map(str, KINDS))}"
            )
        if first.device.type != "cpu" or second.device.type != "cpu":
            raise ValueError("low-rank group factors must be CPU tensors")
        a, b = first.contiguous(), tile_columns(second)
        rank, in_features = first.shape
        return cls(a, b, in_features, second.shape[1], rank, KINDS[first.dtype], (a, b))

    @classmethod
    def prepare_quantized(cls, first: QuantizedTensor, second: QuantizedTensor) -> GroupFactors:
        """From quantized A and B whose lanes are the rank components (A: length ``in``, B: ``out``; the
        view of :mod:`deltakit.ops.quant`), kept as 4-bit codes: the kernel decodes each value to the
        exact fp32 of :func:`~deltakit.ops.quant.dequantize`. ValueError unless
        :func:`quantized_applies` to both; not mutated."""
        for q in (first, second):
            if not quantized_applies(q):
                problem = layout_problem(q)
                raise ValueError(
                    f"quantized factor of shape {list(q.shape)}, {q.bits} bits, groups of {q.group_size}: "
                    + (
                        f"its stored tensors do not hold that layout ({problem})"
                        if problem
                        else f"the 4-bit layout wants a 2-D CPU factor of at most 4 bits in groups of a multiple "
                        f"of {CHUNK}"
                    )
                )
        (rank, in_features), (rank_b, out_features) = _lanes_length(first), _lanes_length(second)
        if rank != rank_b:
            raise ValueError(f"quantized factors of ranks {rank} and {rank_b} do not share a rank")
        a_codes = _chunk_codes(first).reshape(-1)  # rank rows of ceil(in / 16) * 8 bytes
        b_codes = _tile_bytes(_chunk_codes(second))
        a_desc, a_keep = _descriptor(first, a_codes, _chunks(in_features) * 8, group_major=False)
        b_desc, b_keep = _descriptor(second, b_codes, 0, group_major=True)
        keep = (a_codes, b_codes, *a_keep, *b_keep)
        return cls(a_desc, b_desc, in_features, out_features, rank, QUANTIZED_KIND, keep)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the kernel reads."""
        return sum(t.numel() * t.element_size() for t in self.keep)


def quantized_applies(q: QuantizedTensor) -> bool:
    """Whether :meth:`GroupFactors.prepare_quantized` takes ``q``: a 2-D CPU factor of at most 4 bits in
    groups of a multiple of :data:`CHUNK` values, whose stored tensors hold the layout it declares
    (:func:`~deltakit.ops.quant.layout_problem`: the kernel reads them in place)."""
    return (
        len(q.shape) == 2
        and q.bits <= 4
        and q.group_size % CHUNK == 0
        and q.codes.device.type == "cpu"
        and q.scales.device.type == "cpu"
        and (q.zeros is None or q.zeros.device.type == "cpu")
        and layout_problem(q) is None
    )


def quantized_pair_fits(
    first: QuantizedTensor, second: QuantizedTensor, rank: int, in_features: int, out_features: int
) -> bool:
    """Whether quantized A and B make a layer's pair of this ``rank`` and (in, out) features for
    :meth:`GroupFactors.prepare_quantized`: both taken (:func:`quantized_applies`), A's lanes the rank
    components of ``in_features`` values and B's of ``out_features``."""
    return (
        quantized_applies(first)
        and quantized_applies(second)
        and _lanes_length(first) == (rank, in_features)
        and _lanes_length(second) == (rank, out_features)
    )


def _lanes_length(q: QuantizedTensor) -> tuple[int, int]:
    """(lanes, length) of a 2-D quantized tensor: its groups run along ``length``."""
    return q.shape[1 - q.axis], q.shape[q.axis]


def _chunks(length: int) -> int:
    return -(-length // CHUNK)


def _chunk_codes(q: QuantizedTensor) -> torch.Tensor:
    """(lanes, chunks * 8) uint8: each lane's codes in chunks of 16 values (the last padded with zero
    codes), value ``2 q + h`` of a chunk at nibble ``8 h + q`` (QNIBBLE in lowrank_native.c: bytes 0-3
    hold the even values, bytes 4-7 the odd ones, nibble n in byte n // 2, the low one for even n)."""
    lanes, length = _lanes_length(q)
    if q.bits == 4 and length % CHUNK == 0:  # stored value 2 m in the low nibble of byte m: move nibbles
        stored = q.codes.reshape(lanes, -1, 4, 2)  # (lanes, chunks, b, pair): stored bytes 2 b, 2 b + 1
        low, high = stored & 15, stored >> 4  # values 4 b, 4 b + 2 / values 4 b + 1, 4 b + 3
        even = low[..., 0] | (low[..., 1] << 4)  # (lanes, chunks, 4): bytes 0-3 of the layout
        odd = high[..., 0] | (high[..., 1] << 4)  # bytes 4-7
        return torch.cat([even, odd], dim=-1).reshape(lanes, -1)
    codes = unpack_codes(q.codes, q.bits, lanes * length).reshape(lanes, length)
    padded = torch.zeros(lanes, _chunks(length) * CHUNK, dtype=torch.uint8)
    padded[:, :length] = codes
    chunks = padded.reshape(lanes, -1, 8, 2)  # (lanes, chunks, q, h): value 2 q + h
    nibbles = chunks.transpose(2, 3).reshape(lanes, -1, 8, 2)  # nibble 8 h + q, paired into bytes
    return (nibbles[..., 0] | (nibbles[..., 1] << 4)).reshape(lanes, -1)


def _tile_bytes(rows: torch.Tensor) -> torch.Tensor:
    """B's code rows (rank, chunks * 8) in the kernel's column tiles (as :func:`tile_columns` lays out
    values): a full tile's 32 columns are 16 bytes of each row, the last tile takes the rest."""
    rank, width = rows.shape
    tile_bytes = TILE_COLS // 2
    full = width // tile_bytes
    tiles = rows[:, : full * tile_bytes].reshape(rank, full, tile_bytes).transpose(0, 1)  # (t, rank, 16)
    return torch.cat([tiles.reshape(-1), rows[:, full * tile_bytes :].reshape(-1)])


def _descriptor(
    q: QuantizedTensor, codes: torch.Tensor, row_bytes: int, group_major: bool
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The kernel's int64 (8,) descriptor of a factor laid out in ``codes`` (QD_* in lowrank_native.c)
    and the fp32 grid it points at: per group ``(step, origin)``, the values
    :func:`~deltakit.ops.quant.dequantize` computes ``code * step + origin`` with, (lanes, groups, 2), or
    (groups, lanes, 2) when ``group_major`` (B: a column tile reads one group of every lane). A group
    spans ``group_size / 16`` chunks: when that is a power of two the kernel finds a chunk's group by a
    shift; otherwise the grid is repeated per chunk."""
    step = q.scales.float()  # (lanes, groups)
    origin = -((1 << q.bits) - 1) / 2 * step if q.scheme == "symmetric" else q.zeros.float()
    grid = torch.stack([step, origin], dim=-1)  # (lanes, groups, 2)
    chunks = _chunks(_lanes_length(q)[1])
    per_group = min(q.group_size // CHUNK, chunks)  # a longer group: the whole lane
    shift = per_group.bit_length() - 1
    if per_group != 1 << shift:
        grid = grid.repeat_interleave(per_group, dim=1)[:, :chunks]
        shift = 0
    groups = grid.shape[1]
    grid = (grid.transpose(0, 1) if group_major else grid).contiguous()
    fields = [codes.data_ptr(), grid.data_ptr(), row_bytes, groups, shift, int(group_major), 0, 0]
    return torch.tensor(fields, dtype=torch.int64), (grid,)


class LowRankGroup:
    """Several deltas' factors for one linear layer, each applied to its own rows, in one kernel call.

    parts: per delta its :class:`GroupFactors` (kept: their addresses go to the kernel), of one shape but
    the rank, each at its own kind. rows: per part the row indices into the flattened activations,
    disjoint across parts.
    """

    def __init__(self, parts: list[GroupFactors], rows: list[list[int]]):
        if len(parts) != len(rows) or not parts:
            raise ValueError("a low-rank group needs one factor pair and one row list per part")
        in_features, out_features = parts[0].in_features, parts[0].out_features
        for part in parts:
            if part.in_features != in_features or part.out_features != out_features:
                raise ValueError("every part's factors must have the same in and out features")
        flat_rows = [i for r in rows for i in r]
        if any(i < 0 for i in flat_rows) or len(set(flat_rows)) != len(flat_rows):
            raise ValueError("low-rank group rows must be non-negative and belong to one part each")
        self.in_features, self.out_features = in_features, out_features
        self.parts = list(parts)
        self.kinds = torch.tensor([p.kind for p in parts], dtype=torch.int64)
        self.first = torch.tensor([p.first.data_ptr() for p in parts], dtype=torch.int64)
        self.second = torch.tensor([p.second.data_ptr() for p in parts], dtype=torch.int64)
        self.ranks = torch.tensor([p.rank for p in parts], dtype=torch.int64)
        self.offsets = torch.tensor([0, *itertools.accumulate(len(r) for r in rows)], dtype=torch.int64)
        self.rows = torch.tensor(flat_rows, dtype=torch.int64)
        self.max_row = max(flat_rows, default=-1)
        self._lib = native_library()
        #: the kernel's arguments that do not change between calls, from the part count to the rows (their
        #: tensors are kept above; ``deltakit_mixed_shares`` takes the same run)
        self.parts_args = (
            len(self.parts),
            self.first.data_ptr(),
            self.second.data_ptr(),
            self.ranks.data_ptr(),
            self.kinds.data_ptr(),
            self.offsets.data_ptr(),
            self.rows.data_ptr(),
        )

    def add_into(self, x: torch.Tensor, y: torch.Tensor, threads: int | None = None) -> None:
        """``y[rows_p] += (x[rows_p] Aₚᵀ) Bₚ`` for every part; x (N, in) and y (N, out) contiguous CPU
        tensors of one dtype of :data:`KINDS`, y mutated (a 16-bit y takes the fp32 share rounded to
        nearest even, bit for bit ``y.add_(share)``; rows of no part are left as they are).
        threads: default torch's intra-op count (the bits do not depend on it)."""
        check_rows_pair(x, y, "low-rank group")
        if x.shape[1] != self.in_features or y.shape[1] != self.out_features:
            raise ValueError(
                f"low-rank group of ({self.in_features} -> {self.out_features}) got activations "
                f"{list(x.shape)}, output {list(y.shape)}"
            )
        if self.max_row >= x.shape[0]:
            raise ValueError(f"low-rank group rows reach {self.max_row}, activations have {x.shape[0]}")
        self._call(x, y, threads)

    def add_into_trusted(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """:meth:`add_into` for a caller that has checked x (..., in) and y (..., out) to be contiguous CPU
        tensors of one dtype of :data:`KINDS` whose leading dimensions hold this group's rows (a mixed
        batch's executor, per call, for the group it made for that batch): only the feature sizes and
        the row count are checked again (:func:`trusted_rows`). Decoding calls it about 210 times per
        token."""
        trusted_rows(x, y, (self.in_features, self.out_features), self.max_row, "low-rank group")
        self._call(x, y, None)

    def _call(self, x: torch.Tensor, y: torch.Tensor, threads: int | None) -> None:
        if self._lib is None:
            raise ValueError("the low-rank kernel is not available")
        code = self._lib.deltakit_low_rank_multi(
            x.data_ptr(),
            self.in_features,
            self.out_features,
            *self.parts_args,
            y.data_ptr(),
            KINDS[x.dtype],
            threads if threads is not None else torch.get_num_threads(),
        )
        if code != 0:
            raise ValueError(f"low-rank kernel failed (code {code})")
