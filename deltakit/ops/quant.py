"""Group-wise round-to-nearest quantization of float tensors to 2, 3, 4 or 8 bits, stored bit-packed.

Layout. The tensor is viewed with ``axis`` moved last, as ``(lanes, length)`` in row-major order; each lane
is cut into groups of ``group_size`` consecutive values (the last group of a lane may be shorter). Every
group has one fp16 scale (and, for ``asymmetric``, one fp16 offset, the group's minimum), stored as a
``(lanes, groups)`` tensor. The codes are packed in that ``(lanes, length)`` order by
:func:`deltakit.ops.intpack.pack_codes`, so a tensor costs exactly :func:`quantized_nbytes` bytes.

Schemes (``q`` = code in ``[0, 2**bits)``, ``s`` = scale, ``L = 2**bits - 1``):

- ``symmetric``: ``x ≈ (q - L/2) * s`` with ``s = max|x| / (L/2)`` — all ``2**bits`` levels, symmetric
  around zero (no exact zero level; at 2 bits the levels are ±s/2 and ±3s/2).
- ``asymmetric``: ``x ≈ q * s + m`` with ``m = min x`` and ``s = (max x - min x) / L``.

Scales are rounded *up* to fp16 (and offsets down), so every value stays inside its group's range and
round-to-nearest keeps ``|x - dequantize(quantize(x))| <= s / 2`` per element (up to fp32 rounding).
``symmetric`` is the default: on SVD factors of synthetic deltas with ``clip="mse"``, symmetric groups of
32 beat asymmetric groups of 64 (the same bytes) at 2, 3 and 4 bits; with absmax scales the asymmetric
offset is ahead by under 2% (docs/quant_factors.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from deltakit.errors import FormatError, UsageError
from deltakit.ops.finite import all_finite
from deltakit.ops.intpack import pack_codes, packed_nbytes, unpack_codes
from deltakit.ops.signmm import native_library

SUPPORTED_BITS = (2, 3, 4, 8)
SCHEMES = ("symmetric", "asymmetric")
CLIPS = ("absmax", "mse")
CLIP_RATIOS = tuple(1.0 - 0.05 * k for k in range(13))  # 1.0 down to 0.4
PACKING = "lsb-stream"  # see deltakit.ops.intpack
_FP16_MAX = 65504.0
#: int16 pattern of the smallest normal fp16 (2**-14): below it (and above zero) the subnormals
_FP16_MIN_NORMAL_BITS = 0x0400
#: significant bits of an fp16 scale: ``quantize(scale_bits=SCALE_BITS)`` rounds nothing further
SCALE_BITS = 11


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor as stored.

    codes: 1-D uint8, packed codes of the ``(lanes, length)`` view. scales: fp16 ``(lanes, groups)``.
    zeros: fp16 ``(lanes, groups)`` group offsets for ``asymmetric``, else None. axis: non-negative.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    shape: tuple[int, ...]
    bits: int
    group_size: int
    axis: int
    scheme: str = "symmetric"

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the stored tensors (codes + scales + zeros)."""
        extra = 0 if self.zeros is None else self.zeros.numel() * self.zeros.element_size()
        return self.codes.numel() + self.scales.numel() * self.scales.element_size() + extra

    def params(self) -> dict[str, Any]:
        """JSON-serialisable description (for a manifest's codec params)."""
        return {
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.group_size,
            "axis": self.axis,
            "scheme": self.scheme,
            "packing": PACKING,
        }

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors to store under ``prefix + "codes"``, ``"scales"`` and (asymmetric) ``"zeros"``."""
        out = {prefix + "codes": self.codes, prefix + "scales": self.scales}
        if self.zeros is not None:
            out[prefix + "zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], params: dict[str, Any], prefix: str
    ) -> QuantizedTensor:
        """Rebuild from stored tensors + params, validating every field (FormatError on anything off)."""
        shape, bits, group_size, axis, scheme = _parse_params(params)
        lanes, length = _lanes_length(shape, axis)
        groups = lanes * math.ceil(length / group_size)
        codes = _stored(tensors, prefix + "codes", torch.uint8, (packed_nbytes(lanes * length, bits),))
        grid = (lanes, math.ceil(length / group_size))
        scales = _stored(tensors, prefix + "scales", torch.float16, grid)
        zeros = _stored(tensors, prefix + "zeros", torch.float16, grid) if scheme == "asymmetric" else None
        if scheme == "symmetric" and prefix + "zeros" in tensors:
            raise FormatError(f"tensor {prefix}zeros is not expected for scheme 'symmetric'")
        if groups and not (all_finite(scales) and bool((scales >= 0).all())):
            raise FormatError(f"tensor {prefix}scales holds negative or non-finite values")
        if zeros is not None and groups and not all_finite(zeros):
            raise FormatError(f"tensor {prefix}zeros holds non-finite values")
        return cls(codes, scales, zeros, shape, bits, group_size, axis, scheme)


def layout_problem(q: QuantizedTensor) -> str | None:
    """Why ``q``'s stored tensors cannot hold the layout it declares, or None when they can: bits, group
    size, axis and scheme in range; codes 1-D uint8 of exactly the packed size; scales (and zeros for
    ``asymmetric``, none for ``symmetric``) floating ``(lanes, groups)``. Kernels that read the codes
    and grid in place rely on this; :meth:`QuantizedTensor.from_tensors` checks it, and the values, for
    stored tensors, while a plug-in codec may build a QuantizedTensor by hand."""
    shape = tuple(q.shape)
    if (
        not shape
        or not all(_is_int(d) and d >= 1 for d in shape)
        or not (_is_int(q.axis) and 0 <= q.axis < len(shape))
    ):
        return f"shape {list(shape)} with axis {q.axis!r}"
    if (
        q.bits not in SUPPORTED_BITS
        or not (_is_int(q.group_size) and q.group_size >= 1)
        or q.scheme not in SCHEMES
    ):
        return f"{q.bits!r} bits, groups of {q.group_size!r}, scheme {q.scheme!r}"
    lanes, length = _lanes_length(shape, q.axis)
    codes = packed_nbytes(lanes * length, q.bits)
    if q.codes.dtype != torch.uint8 or tuple(q.codes.shape) != (codes,):
        return f"codes {q.codes.dtype} {list(q.codes.shape)}, expected uint8 [{codes}]"
    grid = (lanes, math.ceil(length / q.group_size))
    if (q.zeros is None) != (q.scheme == "symmetric"):
        return f"zeros {'missing' if q.zeros is None else 'given'} for scheme {q.scheme!r}"
    for name, t in (("scales", q.scales), ("zeros", q.zeros)):
        if t is not None and (not t.dtype.is_floating_point or tuple(t.shape) != grid):
            return f"{name} {t.dtype} {list(t.shape)}, expected floating {list(grid)}"
    return None


def quantized_nbytes(
    shape: tuple[int, ...] | list[int], bits: int, group_size: int, axis: int = -1, scheme: str = "symmetric"
) -> int:
    """Exact stored bytes of :func:`quantize` output: packed codes + 2 bytes per scale (+ per offset)."""
    shape = tuple(int(d) for d in shape)
    _check_args(bits, group_size, scheme)
    lanes, length = _lanes_length(shape, _norm_axis(axis, len(shape)))
    per_group = 2 * (2 if scheme == "asymmetric" else 1)
    return packed_nbytes(lanes * length, bits) + per_group * lanes * math.ceil(length / group_size)


def quantize(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    axis: int = -1,
    scheme: str = "symmetric",
    clip: str = "absmax",
    *,
    scale_bits: int = SCALE_BITS,
) -> QuantizedTensor:
    """Round-to-nearest quantization of a float tensor (any float dtype/device, >= 1-D; not mutated).

    clip: ``absmax`` covers each group's full range (error <= scale/2 everywhere); ``mse`` tries
    :data:`CLIP_RATIOS` of that range per group and keeps the one with the least squared error (the
    outliers then clip, but most values round on a finer grid).
    scale_bits: significant bits each fp16 scale keeps (1 to 11; rounded up to them, so the bound above
    holds). With :func:`exact_product_bits` every product of two values of ``symmetric`` tensors
    quantized at ``bits`` <= 4 is exact in fp32 (see there).
    """
    _check_args(bits, group_size, scheme)
    if not isinstance(scale_bits, int) or isinstance(scale_bits, bool) or not 1 <= scale_bits <= SCALE_BITS:
        raise UsageError(f"scale_bits must be an integer from 1 to {SCALE_BITS}, got {scale_bits!r}")
    if clip not in CLIPS:
        raise UsageError(f"clip must be one of {CLIPS}, got {clip!r}")
    if x.ndim == 0 or x.numel() == 0 or not x.dtype.is_floating_point:
        raise UsageError(
            f"quantize needs a non-empty float tensor of >= 1 dims, got {x.dtype} {tuple(x.shape)}"
        )
    if not all_finite(x):
        raise UsageError("quantize needs finite values; the tensor holds NaN or Inf")
    axis = _norm_axis(axis, x.ndim)
    moved = x.to(torch.float32).movedim(axis, -1).contiguous()
    grouped, length = _grouped(moved, group_size)  # (lanes, groups, G)
    ratios = CLIP_RATIOS if clip == "mse" else (1.0,)
    valid = None  # padding does not count in the error; without padding every value counts
    if grouped.shape[1] * group_size != length:
        valid = (torch.arange(grouped.shape[1] * group_size, device=grouped.device) < length).float()
        valid = valid.reshape(1, grouped.shape[1], group_size)
    lanes_per_block = max(1, _BLOCK_VALUES // max(1, len(ratios) * grouped[0].numel()))
    blocks = [
        _best_of_ratios(
            grouped[start : start + lanes_per_block], bits, scheme, ratios, valid, length, scale_bits
        )
        for start in range(0, grouped.shape[0], lanes_per_block)
    ]
    if len(blocks) == 1:  # a factor matrix's lanes fit one block: no copy
        codes, scales, zeros = blocks[0]
    else:
        codes, scales = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
        zeros = None if scheme == "symmetric" else torch.cat([b[2] for b in blocks])
    codes = codes.reshape(codes.shape[0], -1)[:, :length].to(torch.uint8)  # (lanes, length)
    return QuantizedTensor(
        pack_codes(codes, bits), scales, zeros, tuple(x.shape), bits, group_size, axis, scheme
    )


#: values (clip ratios x lanes x group values) that :func:`quantize` works on at once: every clip ratio
#: of a block of lanes is rounded and scored in one set of tensor operations (a few µs of dispatch
#: each, which one ratio at a time paid 13 times over on the small factor matrices), in bounded memory
_BLOCK_VALUES = 1 << 21


def _best_of_ratios(
    grouped: torch.Tensor,
    bits: int,
    scheme: str,
    ratios: tuple[float, ...],
    valid: torch.Tensor | None,
    length: int,
    scale_bits: int = SCALE_BITS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For groups (lanes, groups, G): the float codes (lanes, groups, G), fp16 scales and offsets of the
    clip ratio with the least squared error per group (padding, past ``length`` values a lane, excluded
    by ``valid``, None when there is none), the first such
    ratio on ties (the widest range). Every ratio's values are computed element by element as for one
    ratio alone, so the choice is the one a ratio-by-ratio search makes."""
    extent = _group_extent(grouped, scheme)
    ratio = torch.tensor(ratios, dtype=torch.float32, device=grouped.device).reshape(-1, 1, 1)  # (R, 1, 1)
    if len(ratios) > 1 and grouped.device.type == "cpu":
        lib = native_library()
        if lib is not None:
            return _native_best_of_ratios(lib, grouped, bits, scheme, ratio, extent, length, scale_bits)
    codes, scales, zeros, origin = _round_groups(grouped, bits, scheme, ratio, extent, scale_bits)  # (R, ...)
    err = codes * scales.float()[..., None]
    err.add_(origin[..., None]).sub_(grouped).square_()
    if valid is not None:
        err.mul_(valid)
    # summed in fp64, as the compiled search sums (in order): the two choose alike unless two ratios'
    # errors agree to about 1e-16
    best = err.double().sum(dim=-1).argmin(dim=0, keepdim=True)  # (1, lanes, groups): argmin keeps the first
    pick = best[..., None].expand(1, *codes.shape[1:])
    return (
        codes.gather(0, pick)[0],
        scales.gather(0, best)[0],
        None if zeros is None else zeros.gather(0, best)[0],
    )


def _native_best_of_ratios(
    lib,
    grouped: torch.Tensor,
    bits: int,
    scheme: str,
    ratio: torch.Tensor,
    extent: tuple[torch.Tensor, torch.Tensor | None],
    length: int,
    scale_bits: int = SCALE_BITS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`_best_of_ratios` by the compiled search (``deltakit_clip_search``): each ratio's grid is
    worked out here ((R, lanes, groups) values), the codes and errors of every value there, in one pass
    per ratio over a group held in cache; the codes come back as uint8 (lanes, groups, G)."""
    top = float((1 << bits) - 1)
    scales, zeros, origin = _grids(bits, scheme, ratio, extent, scale_bits)  # (R, lanes, groups) each
    step, origin = scales.float().contiguous(), origin.contiguous()
    grouped = grouped.contiguous()
    lanes, groups, size = grouped.shape
    best = torch.empty((lanes, groups), dtype=torch.int64)
    codes = torch.empty((lanes, groups, size), dtype=torch.uint8)
    status = lib.deltakit_clip_search(
        grouped.data_ptr(),
        lanes,
        groups,
        size,
        length,
        ratio.numel(),
        step.data_ptr(),
        origin.data_ptr(),
        top,
        best.data_ptr(),
        codes.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"quantize: the compiled clip search refused groups of shape {list(grouped.shape)}")
    pick = best[None]  # (1, lanes, groups)
    return codes, scales.gather(0, pick)[0], None if zeros is None else zeros.gather(0, pick)[0]


def _group_extent(grouped: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group (lanes, groups): ``(absmax, None)`` for symmetric grids, ``(min, max)`` for asymmetric."""
    if scheme == "symmetric":
        return grouped.abs().amax(dim=-1), None
    return grouped.amin(dim=-1), grouped.amax(dim=-1)


def _round_groups(
    grouped: torch.Tensor,
    bits: int,
    scheme: str,
    ratio: float | torch.Tensor,
    extent: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    scale_bits: int = SCALE_BITS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Float codes (lanes, groups, G), fp16 scales and offsets, and the fp32 origin of each group's grid.

    ``ratio`` < 1 shrinks the covered range around its centre (symmetric: zero; asymmetric: mid-range).
    A float, or an fp32 (R, 1, 1) tensor of ratios: then every result has a leading R dimension, ratio
    r's entries equal to those of the float ``ratio[r]``.
    extent: :func:`_group_extent` of ``grouped``, when the caller already has it. scale_bits: as for
    :func:`quantize`.
    """
    top = float((1 << bits) - 1)
    extent = extent if extent is not None else _group_extent(grouped, scheme)
    scales, zeros, origin = _grids(bits, scheme, ratio, extent, scale_bits)
    step = scales.float()
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = grouped - origin[..., None]
    codes.div_(safe[..., None]).round_().clamp_(0, top)
    return codes, scales, zeros, origin


def _grids(
    bits: int,
    scheme: str,
    ratio: float | torch.Tensor,
    extent: tuple[torch.Tensor, torch.Tensor | None],
    scale_bits: int = SCALE_BITS,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """fp16 scales (``scale_bits`` significant bits at most), fp16 offsets (asymmetric, else None) and the
    fp32 origin of each group's grid at clip ``ratio`` (a float, or an fp32 (R, 1, 1) tensor: a leading R
    dimension), from its extent."""
    top = float((1 << bits) - 1)
    first, second = extent
    if scheme == "symmetric":
        scales = _keep_bits_up(_fp16_up(first * ratio / (top / 2)), scale_bits)  # (lanes, groups)
        return scales, None, _symmetric_origin(bits, scales.float())
    low, high = first, second
    mid, half = (low + high) / 2, (high - low) / 2 * ratio
    zeros = _fp16_down(mid - half)
    origin = zeros.float()
    return _keep_bits_up(_fp16_up((mid + half - origin) / top), scale_bits), zeros, origin


def _keep_bits_up(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Each non-negative fp16 scale rounded up to at most ``bits`` significant bits (fp16 again; the
    identity at 11, all an fp16 significand holds). The result is exact in fp16: rounding up a normal
    value keeps its exponent or raises it by one, and a subnormal one keeps its lowest bit at or above
    2**-24. UsageError when a scale rounds past the fp16 range."""
    if bits >= SCALE_BITS:
        return scales
    pattern = scales.view(torch.int16)
    if not bool(((pattern < _FP16_MIN_NORMAL_BITS) & (pattern != 0)).any()):
        # zeros and positive normal fp16 values (no sign bit: the int16 patterns are non-negative): adding
        # the dropped bits' mask and clearing them rounds the significand up, and a carry out of it
        # raises the exponent, which is the frexp form's result (both exact); the sum stays below 2**15
        dropped = (1 << (SCALE_BITS - bits)) - 1
        half = ((pattern + dropped) & ~dropped).view(torch.float16)
    else:
        fraction, exponent = torch.frexp(scales.float())  # fraction in [0.5, 1), or 0
        kept = torch.ldexp(torch.ceil(torch.ldexp(fraction, torch.tensor(bits))), exponent - bits)
        half = kept.to(torch.float16)
    if not all_finite(half):
        raise UsageError(f"values too large for fp16 scales (a group scale exceeds {_FP16_MAX})")
    return half


def exact_product_bits(bits: int) -> int:
    """The ``scale_bits`` at which every product of two values of symmetric tensors quantized at ``bits``
    (2, 3 or 4) is exact in fp32. A value is ``(2q - L) / 2 · s``: an odd integer of at most ``bits`` bits
    halved, times a scale of ``12 - bits`` significant bits, so it carries at most 12 significant bits
    and a product of two at most 24, all an fp32 significand holds (the fused rebuild then uses fused
    multiply-adds with the bits of the separate multiply and add, signmm_native.c). At 8 bits that would
    leave 4 bits of scale; SCALE_BITS (no rounding) is returned there."""
    return 12 - bits if bits <= 4 else SCALE_BITS


def dequantize(q: QuantizedTensor, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 tensor of ``q.shape`` on ``device`` (default: the codes' device): each value
    ``code * step + origin`` of its group, the product and the sum each rounded to fp32. On the CPU a
    compiled loop (``dequant_native.c``) writes them in one pass, 2-D tensors straight into their own
    layout (contiguous); elsewhere, and when it is unavailable, torch computes the same values."""
    device = torch.device(device) if device is not None else q.codes.device
    if device.type == "cpu":
        native = _native_dequantize(q)
        if native is not None:
            return native
    moved = _axis_last(q.shape, q.axis)
    lanes, length = _lanes_length(q.shape, q.axis)
    codes = unpack_codes(q.codes.to(device), q.bits, lanes * length).reshape(lanes, length)
    groups = math.ceil(length / q.group_size)
    group = min(q.group_size, length)  # one group of a longer size holds just the lane (no padding to it)
    padded = torch.zeros(lanes, groups * group, dtype=torch.float32, device=device)
    padded[:, :length] = codes.to(torch.float32)
    step, origin = _step_origin(q, device)
    values = padded.reshape(lanes, groups, group) * step[..., None] + origin[..., None]
    return values.reshape(lanes, -1)[:, :length].reshape(moved).movedim(-1, q.axis)


def _step_origin(q: QuantizedTensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (lanes, groups) step and origin of each group: ``code * step + origin`` is its value."""
    step = q.scales.to(device).float()
    if q.scheme == "symmetric":
        return step, _symmetric_origin(q.bits, step)
    return step, q.zeros.to(device).float()


def _symmetric_origin(bits: int, step: torch.Tensor) -> torch.Tensor:
    """The lowest level of a symmetric grid of fp32 ``step`` (centred on zero): ``-(2**bits - 1) / 2 * step``."""
    return -((1 << bits) - 1) / 2 * step


def kernel_grid(q: QuantizedTensor) -> tuple[tuple[int, ...], tuple[torch.Tensor, ...]] | None:
    """``(arguments, held)`` for compiled loops that read ``q``'s codes in place on the CPU. arguments:
    ``(codes address, code bytes, bits, lanes, length, group, groups, step address, origin address)``,
    the leading arguments of ``deltakit_dequantize`` and the fields of the fused kernel's
    ``quant_factor``; value i of lane l is ``code * step[l, i // group] + origin[l, i // group]``
    (contiguous fp32 (lanes, groups) grids; ``group`` at most the lane's length). held: the tensors the
    addresses point into (keep them while the loop may run). None when the loops cannot read ``q``: no
    library, codes not contiguous on the CPU, or a layout :func:`layout_problem` refuses."""
    if q.codes.device.type != "cpu" or not q.codes.is_contiguous() or layout_problem(q) is not None:
        return None
    if native_library() is None:
        return None
    lanes, length = _lanes_length(q.shape, q.axis)
    step, origin = (t.contiguous() for t in _step_origin(q, torch.device("cpu")))  # (lanes, groups)
    codes = q.codes
    arguments = (codes.data_ptr(), codes.numel(), q.bits, lanes, length, min(q.group_size, length))
    arguments += (step.shape[1], step.data_ptr(), origin.data_ptr())
    return arguments, (codes, step, origin)


def _native_dequantize(q: QuantizedTensor) -> torch.Tensor | None:
    """:func:`dequantize` on the CPU by the compiled loop; None when it does not apply
    (:func:`kernel_grid`)."""
    grid = kernel_grid(q)
    if grid is None:
        return None
    arguments, held = grid  # held: the tensors the addresses point into, alive through the call
    lanes, length = arguments[3], arguments[4]
    columns = len(q.shape) == 2 and q.axis == 0  # (length, lanes): lane l is column l
    if columns:
        out = torch.empty(q.shape, dtype=torch.float32)
        strides = (1, lanes)
    else:  # (..., length) with the axis last, moved back below
        out = torch.empty(_axis_last(q.shape, q.axis), dtype=torch.float32)
        strides = (length, 1)
    status = native_library().deltakit_dequantize(*arguments, out.data_ptr(), *strides)
    if status != 0:
        raise ValueError(f"dequantize: the compiled loop refused {q.bits}-bit codes of shape {list(q.shape)}")
    return out if columns else out.movedim(-1, q.axis)


def _grouped(moved: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """(lanes, groups, G) view of an axis-last tensor, the last group padded with its lane's last value."""
    length = moved.shape[-1]
    flat = moved.reshape(-1, length)  # (lanes, length)
    groups = math.ceil(length / group_size)
    pad = groups * group_size - length
    if pad and length:
        flat = torch.cat([flat, flat[:, -1:].expand(-1, pad)], dim=1)
    return flat.reshape(flat.shape[0], groups, group_size), length


def _fp16_up(values: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 >= each fp32 value (UsageError when beyond the fp16 range)."""
    half = values.to(torch.float16)
    pattern = half.view(torch.int16)
    # where rounding to nearest went below, the next fp16 up: pattern + 1 for a positive fp16, - 1 for a
    # negative one (never -0.0 here: a value that rounds to -0.0 is not above it); +inf stays +inf
    step = torch.where(pattern < 0, -1, 1).to(torch.int16) * (half.float() < values)
    half = (pattern + step).view(torch.float16)
    if not all_finite(half):
        raise UsageError(f"values too large for fp16 scales (a group scale exceeds {_FP16_MAX})")
    return half


def _fp16_down(values: torch.Tensor) -> torch.Tensor:
    """Largest fp16 <= each fp32 value (UsageError when beyond the fp16 range)."""
    return -_fp16_up(-values)


def _check_args(bits: int, group_size: int, scheme: str) -> None:
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise UsageError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise UsageError(f"group_size must be a positive integer, got {group_size!r}")
    if scheme not in SCHEMES:
        raise UsageError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _norm_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise UsageError(f"axis={axis!r} is out of range for a {ndim}-D tensor")
    return axis % ndim


def _axis_last(shape: tuple[int, ...], axis: int) -> list[int]:
    """``shape`` with dimension ``axis`` moved last."""
    moved = list(shape)
    moved.append(moved.pop(axis))
    return moved


def _lanes_length(shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    length = shape[axis]
    lanes = math.prod(shape) // length if length else math.prod(shape[:axis] + shape[axis + 1 :])
    return lanes, length


def _parse_params(params: dict[str, Any]) -> tuple[tuple[int, ...], int, int, int, str]:
    """Validated (shape, bits, group_size, axis, scheme) from stored params (FormatError otherwise)."""
    if not isinstance(params, dict):
        raise FormatError("quantized tensor params must be a JSON object")
    shape, bits, group_size = params.get("shape"), params.get("bits"), params.get("group_size")
    axis, scheme = params.get("axis"), params.get("scheme")
    if params.get("packing") != PACKING:
        raise FormatError(f"unknown packing {params.get('packing')!r}; expected {PACKING!r}")
    if not isinstance(shape, list) or not shape or not all(_is_int(d) and 1 <= d < 2**40 for d in shape):
        raise FormatError(f"quantized tensor shape must be a non-empty list of sizes, got {shape!r}")
    if not (_is_int(bits) and bits in SUPPORTED_BITS):
        raise FormatError(f"quantized tensor bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if not (_is_int(group_size) and 1 <= group_size <= 2**31):
        raise FormatError(f"quantized tensor group_size must be a positive integer, got {group_size!r}")
    if not (_is_int(axis) and 0 <= axis < len(shape)):
        raise FormatError(f"quantized tensor axis must index its shape, got {axis!r}")
    if scheme not in SCHEMES:
        raise FormatError(f"quantized tensor scheme must be one of {SCHEMES}, got {scheme!r}")
    return tuple(shape), bits, group_size, axis, scheme


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stored(
    tensors: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> torch.Tensor:
    tensor = tensors.get(name)
    if tensor is None:
        raise FormatError(f"tensor {name} is missing")
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise FormatError(
            f"tensor {name} must be {dtype} of shape {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
        )
    return tensor
