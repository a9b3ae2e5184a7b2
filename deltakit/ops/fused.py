"""Single-pass rebuild of a factored weight: ``cast(base + (scale·S + up·down))`` written once.

The reference computes the same sum as several full fp32 passes over the matrix (unpack the signs, scale
them, add the low-rank product, add the upcast base, cast). Here each tile of rows is read once (base
rows, sign bytes, ``up`` rows), summed in fp32 in a buffer that stays in cache, cast, and written once
into ``out``.

Bit-exactness with the reference (``(base.float() + (S·α + L)).to(dtype)``, L = ``low_rank_product(up, down)``):

* ``S·α`` is exact (a sign flip of ``α`` in fp32); the lookup table holds those products;
* fp32 addition is commutative, so ``(L + S·α) + base`` rounds as ``base + (S·α + L)``;
* the low-rank product of a row tile equals those rows of the full product: on the CPU both come from
  :func:`deltakit.ops.lowrank.low_rank_product`, whose fixed per-element order does not depend on the
  rows or the thread count; on CUDA it is one matmul (cuBLAS may pick another kernel for other shapes),
  so the tile is the whole matrix there. CPU tiles are multiples of :data:`TILE_ALIGN` rows and at
  least :data:`MIN_TILE_ROWS`. Tests compare every built-in codec's result with the reference bit for bit.

On the CPU, for fp32/bf16 tensors, a compiled loop (``deltakit_fused_rows`` in ``signmm_native.c``, built
like the sign kernel of :mod:`deltakit.ops.signmm`) takes each tile 8 rows at a time: the rows' low-rank
product (the operations of :func:`~deltakit.ops.lowrank.low_rank_product`) into a per-thread buffer that
stays in cache, then sign lookup, base add, rounding, cast and finite check in one pass. It performs the
same fp32 operations in the same order, so its bits are the torch tiles' (tested, NaN bits included).
fp16 and bf16 factors are passed as stored and widened inside the kernel (exact), once per call for
``down`` and per 8-row block for ``up``: no fp32 copies are allocated per rebuild.
Without a C compiler, with ``DELTAKIT_NATIVE=0``, for an fp16 base or output, or on CUDA the torch tiles
run.
"""

from __future__ import annotations

import threading

import torch

from deltakit.errors import NonFiniteError
from deltakit.ops.lowrank import low_rank_product
from deltakit.ops.signmm import native_library

#: dtype codes of the native kernel (``deltakit_fused_rows`` in ops/signmm_native.c)
NATIVE_KINDS = {torch.float32: 0, torch.bfloat16: 1}
#: factor dtype codes of the same kernel: 16-bit factors are read as stored and widened inside it (exact)
FACTOR_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

#: fp32 values per CPU tile (4 MiB): on the SmolLM2-135M swap, 64 K-value tiles spent more time in
#: per-tile Python and dispatch than in arithmetic (0.54 s a swap against 0.25 s at 1 M; whole matrices
#: are no faster), see docs/speed.md
TILE_ELEMENTS = 1 << 20
#: tile starts stay multiples of 8 rows, so every tile's sign bits start on a byte boundary
TILE_ALIGN = 8
MIN_TILE_ROWS = 32

_TABLES: dict[torch.device, torch.Tensor] = {}
#: base dtypes whose values fp32 holds exactly: added to the fp32 tile as they are (no upcast copy)
_EXACT_IN_FP32 = (torch.float16, torch.bfloat16, torch.float32)


class _Workspace(threading.local):
    """Per-thread CPU scratch buffers for the tiles, grown on demand and reused across calls.

    A fresh multi-MiB tensor per tile costs a page fault per 4 KiB page (the CPU allocator returns large
    blocks to the system): on a 1536×576 matrix that doubled the rebuild time. CUDA tensors come from
    torch's caching allocator and do not use this.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat CPU tensor of at least ``numel`` elements (contents undefined), sliced to ``numel``."""
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(numel, dtype=dtype)
            self.buffers[key] = buf
        return buf[:numel]


_WORKSPACE = _Workspace()


def _sign_table(device: torch.device) -> torch.Tensor:
    """(256, 8) fp32: row b holds the ±1 values of byte b's bits, least significant bit first."""
    table = _TABLES.get(device)
    if table is None:
        bits = (torch.arange(256, dtype=torch.int64).reshape(-1, 1) >> torch.arange(8)) & 1  # (256, 8)
        table = (bits.to(torch.float32) * 2 - 1).to(device)
        _TABLES[device] = table
    return table


def tile_rows(rows: int, cols: int, device: torch.device) -> int:
    """Rows per tile: the whole matrix on CUDA, else about TILE_ELEMENTS values (multiple of TILE_ALIGN)."""
    if device.type != "cpu":
        return rows
    target = max(MIN_TILE_ROWS, TILE_ELEMENTS // max(cols, 1))
    return max(TILE_ALIGN, target // TILE_ALIGN * TILE_ALIGN)


def fused_rebuild(
    base: torch.Tensor,
    dtype: torch.dtype,
    *,
    signs: torch.Tensor | None = None,
    scale: float = 0.0,
    up: torch.Tensor | None = None,
    down: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    check_finite: bool = False,
    name: str = "tensor",
    tile: int | None = None,
) -> torch.Tensor:
    """``cast(base.float() + (scale·S + low_rank_product(up, down)), dtype)`` for a 2-D ``base``.

    base: (rows, cols), any float dtype, on the compute device; not mutated. signs: packed ±1 bits of S
    (uint8, row-major, least significant bit first) or None. up (rows, r) and down (r, cols): both or
    neither. out: (rows, cols) tensor written in place (its own dtype; values are rounded to ``dtype``
    first), or None to allocate one of ``dtype``. check_finite: raise NonFiniteError (naming ``name``)
    when a written value is NaN or Inf; rows before the bad tile are already written. tile: rows per tile
    (a multiple of TILE_ALIGN; default: the whole matrix for the compiled kernel, :func:`tile_rows` for
    the torch tiles). Returns ``out``.
    """
    rows, cols = base.shape
    device = base.device
    if out is None:
        out = torch.empty((rows, cols), dtype=dtype, device=device)
    packed = checked_parts(base, signs, up, down, out, name)
    if base.numel() == 0:
        return out
    native = native_tiles(base, dtype, out, signs is not None or up is not None)
    # the compiled kernel keeps its fp32 rows in cache whatever the row count: one call per matrix (each
    # call widens 16-bit factors once per thread)
    step = tile if tile is not None else rows if native is not None else tile_rows(rows, cols, device)
    if step < rows and step % TILE_ALIGN:
        raise ValueError(f"{name}: tile={step} is not a multiple of {TILE_ALIGN} rows")
    extremes = []  # per tile (min, max) of the fp32 sums: NaN propagates; rounding is monotonic
    table = None  # (256, 8) ±α of the torch tiles' sign lookup
    if native is None and signs is not None:
        table = _sign_table(device) * float(scale)
    if native is not None and up is not None and factor_kind(up, down) is not None:
        up32, down32 = up.contiguous(), down.contiguous()  # (rows, r), (r, cols): widened by the kernel
    else:
        up32 = up.to(device=device, dtype=torch.float32) if up is not None else None  # (rows, r)
        down32 = down.to(device=device, dtype=torch.float32) if down is not None else None  # (r, cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if native is not None:
            extremes.append(
                _native_tile(native, base, packed, float(scale), up32, down32, out, dtype, r0, r1)
            )
            if check_finite and not finite_extremes(extremes[-1:], dtype, out.dtype):
                break
            continue
        acc = _tile_sum(base, table, packed, up32, down32, r0, r1)  # (r1 - r0, cols) fp32
        out[r0:r1].copy_(acc if out.dtype == dtype else acc.to(dtype))
        if check_finite:
            extremes.append(torch.stack(torch.aminmax(acc)))
            if device.type == "cpu" and not finite_extremes(extremes[-1:], dtype, out.dtype):
                break
    if check_finite and not finite_extremes(extremes, dtype, out.dtype):
        raise NonFiniteError(f"{name} decodes to NaN or Inf values")
    return out


def checked_parts(
    base: torch.Tensor,
    signs: torch.Tensor | None,
    up: torch.Tensor | None,
    down: torch.Tensor | None,
    out: torch.Tensor,
    name: str,
) -> torch.Tensor | None:
    """Refuse parts that do not rebuild ``base``'s (rows, cols) matrix (ValueError naming ``name``); the
    flat sign bytes on ``base``'s device, or None. The compiled kernel indexes every part by the base's
    shape: a mismatch must never reach it."""
    rows, cols = base.shape
    if tuple(out.shape) != (rows, cols):
        raise ValueError(f"{name}: out has shape {list(out.shape)}, expected {[rows, cols]}")
    packed = signs.reshape(-1).to(base.device) if signs is not None else None
    if packed is not None and packed.numel() * 8 < rows * cols:
        raise ValueError(f"{name}: {packed.numel()} sign bytes cannot hold {rows}x{cols} bits")
    if (up is None) != (down is None):
        raise ValueError(f"{name}: up and down come together (got only one)")
    if up is not None and (
        up.dim() != 2 or down.dim() != 2 or up.shape[0] != rows or down.shape != (up.shape[1], cols)
    ):
        raise ValueError(
            f"{name}: factors up {list(up.shape)} and down {list(down.shape)} do not rebuild a "
            f"{rows}x{cols} matrix"
        )
    return packed


def native_tiles(base: torch.Tensor, dtype: torch.dtype, out: torch.Tensor, has_parts: bool):
    """The compiled tile kernel when it applies (CPU, contiguous fp32/bf16 tensors, something to add),
    else None: the torch tiles are used."""
    if not has_parts or base.device.type != "cpu" or out.device.type != "cpu":
        return None
    if not (base.is_contiguous() and out.is_contiguous()):
        return None
    if not {base.dtype, dtype, out.dtype} <= NATIVE_KINDS.keys():
        return None
    return native_library()


_NO_VALUES = torch.zeros(1)  # an address for factors with no values: nothing is read from it


def factor_pointer(factor: torch.Tensor) -> int:
    """The address the compiled kernel reads ``factor`` at. An empty tensor (rank 0) reports address 0,
    which the kernel takes for "no low-rank part" (the base copied as is, -0.0 kept) where the reference
    adds a zero product (-0.0 becomes +0.0): it gets a real address the kernel reads nothing from."""
    return factor.data_ptr() if factor.numel() else _NO_VALUES.data_ptr()


def factor_kind(up: torch.Tensor, down: torch.Tensor) -> int | None:
    """The kernel's code for factors it reads as stored (one CPU dtype of :data:`FACTOR_KINDS`), else None."""
    if up.dtype != down.dtype or up.device.type != "cpu" or down.device.type != "cpu":
        return None
    return FACTOR_KINDS.get(up.dtype)


def _native_tile(
    lib,
    base: torch.Tensor,
    packed: torch.Tensor | None,
    scale: float,
    up32: torch.Tensor | None,
    down32: torch.Tensor | None,
    out: torch.Tensor,
    dtype: torch.dtype,
    r0: int,
    r1: int,
) -> torch.Tensor:
    """Rows r0:r1 of ``out`` written by the compiled kernel, the low-rank rows computed inside it a few
    rows at a time (the torch tile's operations, in its order); returns the (min, max) of the fp32 sums.
    The factors may be fp32, fp16 or bf16 (both the same): the kernel widens 16-bit ones exactly."""
    cols = base.shape[1]
    bits = None
    if packed is not None:
        bits = packed[r0 * cols // 8 :].contiguous()  # r0 * cols is a multiple of 8 (TILE_ALIGN rows)
    has_low = up32 is not None and down32 is not None
    if has_low:
        up32, down32 = up32.contiguous(), down32.contiguous()
    extremes = torch.empty(2, dtype=torch.float32)
    code = lib.deltakit_fused_rows(
        base[r0:r1].data_ptr(),
        NATIVE_KINDS[base.dtype],
        factor_pointer(up32) if has_low else None,
        factor_pointer(down32) if has_low else None,
        FACTOR_KINDS[up32.dtype] if has_low else 0,
        up32.shape[1] if has_low else 0,
        cols,
        r0,
        r1,
        bits.data_ptr() if bits is not None else None,
        scale,
        NATIVE_KINDS[dtype],
        out[r0:r1].data_ptr(),
        NATIVE_KINDS[out.dtype],
        extremes.data_ptr(),
        torch.get_num_threads(),
    )
    if code != 0:
        raise ValueError(f"fused tile kernel refused its arguments (code {code})")
    return extremes


def _low_rank_rows(
    up32: torch.Tensor | None, down32: torch.Tensor | None, r0: int, r1: int
) -> torch.Tensor | None:
    """fp32 rows r0:r1 of ``up32 @ down32`` (None without factors); on the CPU in this thread's workspace,
    valid until the next tile."""
    if up32 is None or down32 is None:
        return None
    acc = None
    if up32.device.type == "cpu":
        acc = _WORKSPACE.get("acc", (r1 - r0) * down32.shape[1], torch.float32).view(r1 - r0, down32.shape[1])
    return low_rank_product(up32, down32, rows=(r0, r1), out=acc)  # (tile, cols)


def finite_extremes(extremes: list[torch.Tensor], dtype: torch.dtype, written: torch.dtype) -> bool:
    """Whether every value between these fp32 extremes stays finite once rounded to ``dtype`` and then
    to the written dtype (the extremes round to the extremes of the rounded values)."""
    values = torch.cat(extremes).to(dtype).to(written)
    return bool(torch.isfinite(values).all())


def _tile_sum(
    base: torch.Tensor,
    table: torch.Tensor | None,
    packed: torch.Tensor | None,
    up32: torch.Tensor | None,
    down32: torch.Tensor | None,
    r0: int,
    r1: int,
) -> torch.Tensor:
    """fp32 rows r0:r1 of ``L + S·α + base`` (L, S·α: the parts present), summed in that order.

    On the CPU the result lives in this thread's workspace: it is valid until the next call."""
    cols = base.shape[1]
    n = (r1 - r0) * cols
    cpu = base.device.type == "cpu"
    acc = _low_rank_rows(up32, down32, r0, r1)
    if table is not None and packed is not None:
        first = r0 * cols // 8  # exact: r0 is a multiple of TILE_ALIGN (or the tile is the whole matrix)
        raw = packed[first : first + (n + 7) // 8]
        if cpu:
            index = _WORKSPACE.get("index", raw.numel(), torch.int64).copy_(raw)
            signed = _WORKSPACE.get("signs", raw.numel() * 8, torch.float32).view(-1, 8)
            torch.index_select(table, 0, index, out=signed)  # (bytes, 8) ±α
        else:
            signed = torch.index_select(table, 0, raw.long())  # (bytes, 8) ±α
        signed = signed.reshape(-1)[:n].reshape(r1 - r0, cols)
        acc = signed if acc is None else acc.add_(signed)
    if acc is None:
        return base[r0:r1].to(torch.float32)
    rows = base[r0:r1]
    return acc.add_(rows if rows.dtype in _EXACT_IN_FP32 else rows.to(torch.float32))
