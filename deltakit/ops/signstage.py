"""The sign stage of a sign codec's encode: the fp32 delta, its packed signs and its sign residual.

``delta = target - base`` in fp32, ``signs`` = the bits of ``delta >= 0`` (:func:`~deltakit.ops.bitpack.
pack_signs`), and ``delta - scale * S`` for the ±1 matrix S those bits hold. The torch forms take several
full passes (the conversions, the subtraction, a bool tensor, its packing, a ±1 fp32 matrix and the
residual); on the CPU a compiled loop (``signstage_native.c``, built with the other kernels by
:func:`deltakit.ops.signmm.native_library`) does each in one pass on one thread. Every operation involved
is exact or a single IEEE fp32 subtraction, so both forms give the same bits (tests compare them).
"""

from __future__ import annotations

import torch

from deltakit.ops.bitpack import pack_signs
from deltakit.ops.signmm import native_for

#: dtype codes of the compiled loop
_KINDS = {torch.float32: 0, torch.bfloat16: 1}


def sign_stage(
    base: torch.Tensor, target: torch.Tensor, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta, signs)``: ``target - base`` in fp32 on ``device`` (same shape) and the packed bits of
    ``delta >= 0`` (uint8, ``ceil(numel / 8)`` bytes, on the CPU).

    base, target: same shape, any float dtype and device; not mutated.
    """
    if base.shape != target.shape:
        raise ValueError(f"base {tuple(base.shape)} and target {tuple(target.shape)} differ in shape")
    device = torch.device(device)
    lib = native_for((base, target), _KINDS) if device.type == "cpu" else None
    if lib is None:
        delta = target.to(device=device, dtype=torch.float32) - base.to(device=device, dtype=torch.float32)
        return delta, pack_signs(delta).cpu()
    delta = torch.empty(base.shape, dtype=torch.float32)
    signs = torch.empty((base.numel() + 7) // 8, dtype=torch.uint8)
    code = lib.deltakit_sign_stage(
        base.data_ptr(),
        _KINDS[base.dtype],
        target.data_ptr(),
        _KINDS[target.dtype],
        base.numel(),
        delta.data_ptr(),
        signs.data_ptr(),
    )
    if code != 0:
        raise ValueError(f"sign stage kernel refused its arguments (code {code})")
    return delta, signs


def sign_residual(delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``delta - scale * S`` with S = +1 where ``delta >= 0`` and -1 elsewhere: a new fp32 tensor of
    ``delta``'s shape and device (delta: fp32, not mutated)."""
    lib = native_for((delta,), _KINDS)
    if lib is None or delta.dtype != torch.float32:
        return delta - scale * torch.where(delta >= 0, 1.0, -1.0)
    out = torch.empty_like(delta)
    code = lib.deltakit_sign_residual(delta.data_ptr(), delta.numel(), float(scale), out.data_ptr())
    if code != 0:
        raise ValueError(f"sign residual kernel refused its arguments (code {code})")
    return out
