"""Many single-pass rebuilds in one compiled call: what a hot swap writes into a served model.

A swap rebuilds every touched matrix of the model (210 on SmolLM2-135M). Through
:func:`deltakit.ops.fused.fused_rebuild` each one is its own call: parts checked, a kernel call and a
parallel region per matrix. :class:`FusedBatch` checks every write once and hands the compiled kernel
(``deltakit_fused_batch`` in ``signmm_native.c``) all the matrices it takes in one call, one parallel
region in which each thread takes a contiguous run of 8-row blocks of about equal estimated cost. Each
element gets the operations of ``fused_rebuild``'s compiled loop, so the bits are the same, for any
number of threads (tested). Group-quantized factors (a write's ``quantized``) are read as codes: the
kernel decodes ``down`` once per matrix and thread and ``up`` into 8-row blocks, each value the
``code * step + origin`` of :func:`~deltakit.ops.quant.dequantize`, so a cached delta holds no fp32
copies of its factors (about 8x the bytes of 4-bit codes) and the bits are those of the dequantized
factors (tested over every width, both schemes and odd layouts). Writes the compiled kernel does not take
(CUDA, fp16 bases or outputs, no compiler, layouts it cannot read in place) run through
``fused_rebuild`` one by one, quantized factors dequantized first.

A batch can be kept and run again (a swap back to a delta already written once): its checks and
pointers hold for as long as the tensors it was built from stay where they are, which the caller
guarantees (:class:`deltakit.runtime.hotswap.HotSwapRuntime` compares the parameters' and pristine
copies' addresses before each reuse).
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass

import torch

from deltakit.errors import NonFiniteError
from deltakit.ops.fused import (
    NATIVE_KINDS,
    checked_parts,
    factor_kind,
    factor_pointer,
    fused_rebuild,
    native_tiles,
)
from deltakit.ops.quant import QuantizedTensor, dequantize, kernel_grid
from deltakit.ops.signmm import native_library

#: the kernel's factor kind of group-quantized factors read as codes (``quant_factor`` in signmm_native.c)
QUANTIZED_FACTOR_KIND = 3


@dataclass(frozen=True)
class FusedWrite:
    """One matrix: the arguments of :func:`~deltakit.ops.fused.fused_rebuild`, ``out`` given.

    quantized: group-quantized ``(up (rows, r), down (r, cols))`` given instead of ``up`` and ``down``:
    the compiled batch reads their codes (the bits of their dequantized values); other paths dequantize
    them first."""

    base: torch.Tensor
    dtype: torch.dtype
    out: torch.Tensor
    signs: torch.Tensor | None = None
    scale: float = 0.0
    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    name: str = "tensor"
    quantized: tuple[QuantizedTensor, QuantizedTensor] | None = None

    def factors(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(up, down)``: as given, or the quantized ones dequantized to fp32."""
        if self.up is None and self.quantized is not None:
            return dequantize(self.quantized[0]), dequantize(self.quantized[1])
        return self.up, self.down

    def rebuild_alone(self, *, check_finite: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """This write on its own through :func:`~deltakit.ops.fused.fused_rebuild`, into ``out`` (default:
        the write's own); returns it."""
        up, down = self.factors()
        return fused_rebuild(
            self.base,
            self.dtype,
            signs=self.signs,
            scale=self.scale,
            up=up,
            down=down,
            out=self.out if out is None else out,
            check_finite=check_finite,
            name=self.name,
        )


class _QuantFactor(ctypes.Structure):
    """``quant_factor`` of ops/signmm_native.c: a group-quantized factor read as codes."""

    _fields_ = [
        ("packed", ctypes.c_void_p),
        ("nbytes", ctypes.c_int64),
        ("bits", ctypes.c_int64),
        ("lanes", ctypes.c_int64),
        ("length", ctypes.c_int64),
        ("group", ctypes.c_int64),
        ("groups", ctypes.c_int64),
        ("step", ctypes.c_void_p),
        ("origin", ctypes.c_void_p),
    ]


def _quant_factor(q: QuantizedTensor, axis: int) -> tuple[_QuantFactor, tuple] | None:
    """(the kernel's description of a stored 2-D factor quantized along ``axis``, the tensors it points
    into), or None when the kernel cannot read it in place (see :func:`~deltakit.ops.quant.kernel_grid`)."""
    if len(q.shape) != 2 or q.axis != axis:
        return None
    grid = kernel_grid(q)
    if grid is None:
        return None
    arguments, held = grid
    return _QuantFactor(*arguments), held


class _Job(ctypes.Structure):
    """``fused_job`` of ops/signmm_native.c: one matrix of a batch (base, packed and out at row 0)."""

    _fields_ = [
        ("base", ctypes.c_void_p),
        ("up", ctypes.c_void_p),
        ("down", ctypes.c_void_p),
        ("packed", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("rank", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("r0", ctypes.c_int64),
        ("r1", ctypes.c_int64),
        ("alpha", ctypes.c_float),
        ("base_kind", ctypes.c_int32),
        ("factor_kind", ctypes.c_int32),
        ("round_kind", ctypes.c_int32),
        ("out_kind", ctypes.c_int32),
    ]


class FusedBatch:
    """Writes checked once, ready to run: the compiled ones in one call, the others one by one.

    writes: every write's parts are checked on construction (ValueError naming the first that does not
    fit its base; nothing is written). Neither ``base`` nor the parts are mutated by :meth:`run`.
    """

    def __init__(self, writes: list[FusedWrite]) -> None:
        compiled: list[tuple[FusedWrite, _Job, tuple]] = []
        self.single: list[FusedWrite] = []
        for write in writes:
            packed = checked_parts(write.base, write.signs, write.up, write.down, write.out, write.name)
            _check_quantized(write)
            job = batch_job(write, packed)
            if job is None:
                self.single.append(write)
            else:
                compiled.append((write, *job))
        self.compiled = [write for write, _, _ in compiled]
        self._held = [held for _, _, held in compiled]  # the tensors the jobs point into
        self._jobs = (_Job * len(compiled))(*(job for _, job, _ in compiled))
        self._extremes = torch.empty(len(compiled), 2, dtype=torch.float32)  # (n, 2) min, max per job
        self._dtypes = [(w.dtype, w.out.dtype) for w in self.compiled]

    def run(self, *, check_finite: bool = False) -> None:
        """Write every ``out``. check_finite: raise NonFiniteError naming a write with a NaN or Inf value
        (the compiled ones' first in order, else the first of the others); the others may be written."""
        if self.compiled:
            code = native_library().deltakit_fused_batch(
                self._jobs, len(self.compiled), self._extremes.data_ptr(), torch.get_num_threads()
            )
            if code != 0:
                raise ValueError(f"fused batch kernel refused its arguments (code {code})")
            if check_finite:
                finite = _finite_rows(self._extremes, self._dtypes)
                bad = next((w for w, ok in zip(self.compiled, finite, strict=True) if not ok), None)
                if bad is not None:
                    raise NonFiniteError(f"{bad.name} decodes to NaN or Inf values")
        for write in self.single:
            write.rebuild_alone(check_finite=check_finite)


def fused_rebuild_many(writes: list[FusedWrite], *, check_finite: bool = False) -> None:
    """:func:`~deltakit.ops.fused.fused_rebuild` of every write into its ``out``, the same bits: parts
    checked first (ValueError, nothing written), then :meth:`FusedBatch.run`."""
    FusedBatch(writes).run(check_finite=check_finite)


def _finite_rows(extremes: torch.Tensor, dtypes: list[tuple[torch.dtype, torch.dtype]]) -> list[bool]:
    """Whether each row's (min, max) of ``extremes`` (n, 2) stays finite once rounded to its fine-tune
    dtype and then to its written dtype (as :func:`~deltakit.ops.fused.finite_extremes`), one conversion
    per distinct pair."""
    finite = [True] * len(dtypes)
    pending = []  # rows whose extremes reach past a dtype's largest finite value, or are NaN
    for i, ((low, high), pair) in enumerate(zip(extremes.tolist(), dtypes, strict=True)):
        limit = _finite_limit(pair)
        if not (-limit <= low and high <= limit):  # within it, both roundings stay finite
            pending.append(i)
    for pair in {dtypes[i] for i in pending}:
        rows = [i for i in pending if dtypes[i] == pair]
        values = extremes[rows].to(pair[0]).to(pair[1])  # (k, 2)
        for i, ok in zip(rows, torch.isfinite(values).all(dim=1).tolist(), strict=True):
            finite[i] = ok
    return finite


@functools.cache
def _finite_limit(pair: tuple[torch.dtype, torch.dtype]) -> float:
    """The largest value of the fine-tune dtype ``pair[0]`` that the written dtype ``pair[1]`` holds too.
    A value within it rounds (to nearest) to at most it in the first dtype, and then to at most the second
    dtype's largest finite value in the second: finite in both. (bf16's rounding can lift 65504, fp16's
    largest value, to 65536, so the bound for bf16 then fp16 is 65280, the bf16 value below.)"""
    first, second = pair
    if not (first.is_floating_point and second.is_floating_point):
        return -math.inf  # no finite bound: every row takes the conversions
    bound = min(torch.finfo(first).max, torch.finfo(second).max)
    value = torch.tensor(bound, dtype=torch.float32).to(first)  # both maxima are fp32 values
    if value.item() > bound:
        value = torch.nextafter(value, torch.tensor(-math.inf, dtype=first))
    return value.item()


def _check_quantized(write: FusedWrite) -> None:
    """Refuse quantized factors that do not rebuild the write's (rows, cols) matrix (ValueError naming
    it), as :func:`~deltakit.ops.fused.checked_parts` refuses float ones."""
    if write.quantized is None or write.up is not None:
        return
    rows, cols = write.base.shape
    q_up, q_down = write.quantized
    up, down = tuple(q_up.shape), tuple(q_down.shape)
    if len(up) != 2 or len(down) != 2 or up[0] != rows or down != (up[1], cols):
        raise ValueError(
            f"{write.name}: factors up {list(up)} and down {list(down)} do not rebuild a {rows}x{cols} matrix"
        )


def batch_job(write: FusedWrite, packed: torch.Tensor | None) -> tuple[_Job, tuple] | None:
    """(the kernel's job, the tensors it points into) for a write whose parts were checked
    (:func:`~deltakit.ops.fused.checked_parts` gave ``packed``), or None when the compiled batch does not
    take it."""
    base, up, down = write.base, write.up, write.down
    codes = write.quantized is not None and up is None
    if native_tiles(base, write.dtype, write.out, packed is not None or up is not None or codes) is None:
        return None
    if base.numel() == 0:
        return None
    kind, rank, held = 0, 0, ()
    up_pointer = down_pointer = None
    if codes:
        parts = (_quant_factor(write.quantized[0], 0), _quant_factor(write.quantized[1], 1))
        if parts[0] is None or parts[1] is None:
            return None
        kind, rank = QUANTIZED_FACTOR_KIND, int(write.quantized[0].shape[1])
        up_pointer, down_pointer = (ctypes.addressof(part[0]) for part in parts)
        held = (parts, write.quantized)
    elif up is not None:
        kind = factor_kind(up, down)
        if kind is None:
            return None
        up, down = up.contiguous(), down.contiguous()  # (rows, r), (r, cols)
        up_pointer, down_pointer, rank = factor_pointer(up), factor_pointer(down), up.shape[1]
    packed = packed.contiguous() if packed is not None else None
    job = _Job(
        base.data_ptr(),
        up_pointer,
        down_pointer,
        packed.data_ptr() if packed is not None else None,
        write.out.data_ptr(),
        rank,
        base.shape[1],
        0,
        base.shape[0],
        float(write.scale),
        NATIVE_KINDS[base.dtype],
        kind,
        NATIVE_KINDS[write.dtype],
        NATIVE_KINDS[write.out.dtype],
    )
    return job, (base, up, down, packed, write.out, held)
