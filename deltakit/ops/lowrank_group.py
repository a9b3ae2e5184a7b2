"""Low-rank shares of several deltas, each on its own activation rows, in one compiled call.

A mixed-delta batch adds, for every row t using delta p, ``(x_t Aₚᵀ) Bₚ`` to a linear layer's output,
with ``Aₚ`` (rank, in) and ``Bₚ`` (rank, out) the delta's factors in the order they are applied. While
decoding there are a few rows per delta and the cost is reading the factors: :class:`LowRankGroup` keeps
them at their stored width (fp16 or bf16 factors stay 16-bit, half the bytes of an fp32 copy) and the
kernel (``deltakit_low_rank_multi`` in ``lowrank_native.c``) widens them in registers, with threads
splitting rank components and output columns, never a sum. Each output element's arithmetic is fixed,
so the bits do not depend on the thread count or on which rows and deltas share the call. CPU only, and
only when the compiled library is there (:func:`available`); callers keep a torch path otherwise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from deltakit.ops.signmm import native_library

#: factor dtype -> the kernel's kind code
KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
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
    """One delta's factors for one layer, ready for the kernel: ``first`` A (rank, in) contiguous and
    ``second`` B (rank, out) in column tiles (:func:`tile_columns`), one dtype of :data:`KINDS`, CPU."""

    first: torch.Tensor
    second: torch.Tensor
    out_features: int

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
        return cls(first.contiguous(), tile_columns(second), second.shape[1])

    @property
    def rank(self) -> int:
        return self.first.shape[0]

    @property
    def nbytes(self) -> int:
        return (self.first.numel() + self.second.numel()) * self.first.element_size()


class LowRankGroup:
    """Several deltas' factors for one linear layer, each applied to its own rows, in one kernel call.

    parts: per delta its :class:`GroupFactors` (kept: their addresses go to the kernel), all of one
    dtype and shape but the rank. rows: per part the row indices into the flattened activations,
    disjoint across parts.
    """

    def __init__(self, parts: list[GroupFactors], rows: list[list[int]]):
        if len(parts) != len(rows) or not parts:
            raise ValueError("a low-rank group needs one factor pair and one row list per part")
        dtype = parts[0].first.dtype
        in_features, out_features = parts[0].first.shape[1], parts[0].out_features
        for part in parts:
            if part.first.shape[1] != in_features or part.out_features != out_features:
                raise ValueError("every part's factors must have the same in and out features")
            if part.first.dtype != dtype or part.second.dtype != dtype:
                raise ValueError("low-rank group factors must all have one dtype")
            if part.second.numel() != part.rank * out_features:
                raise ValueError("a tiled second factor must hold rank x out values")
        flat_rows = [i for r in rows for i in r]
        if any(i < 0 for i in flat_rows) or len(set(flat_rows)) != len(flat_rows):
            raise ValueError("low-rank group rows must be non-negative and belong to one part each")
        self.in_features, self.out_features = in_features, out_features
        self.kind = KINDS[dtype]
        self.parts = list(parts)
        self.first = torch.tensor([p.first.data_ptr() for p in parts], dtype=torch.int64)
        self.second = torch.tensor([p.second.data_ptr() for p in parts], dtype=torch.int64)
        self.ranks = torch.tensor([p.rank for p in parts], dtype=torch.int64)
        self.offsets = torch.tensor([0, *itertools.accumulate(len(r) for r in rows)], dtype=torch.int64)
        self.rows = torch.tensor(flat_rows, dtype=torch.int64)
        self.max_row = max(flat_rows, default=-1)
        self._lib = native_library()
        #: the call's arguments that do not change between calls (their tensors are kept above)
        self._parts_args = (
            len(self.parts),
            self.first.data_ptr(),
            self.second.data_ptr(),
            self.ranks.data_ptr(),
            self.kind,
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
            *self._parts_args,
            y.data_ptr(),
            KINDS[x.dtype],
            threads if threads is not None else torch.get_num_threads(),
        )
        if code != 0:
            raise ValueError(f"low-rank kernel failed (code {code})")
