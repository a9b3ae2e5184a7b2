"""Whether a tensor holds only finite values, in one reduction pass.

``torch.isfinite(t).all()`` materialises a boolean tensor of t's size first; on CPU fp16 tensors it is
also unvectorised (about 24x slower than the reduction here on a 3.5 M-value fp16 tensor). ``aminmax``
propagates NaN and keeps ±Inf, so the two extremes are finite exactly when every value is.
"""

from __future__ import annotations

import torch

from deltakit.ops.signmm import native_for


def all_finite(tensor: torch.Tensor) -> bool:
    """True when floating ``tensor`` holds no NaN or Inf (always true for other dtypes and for empty
    tensors). Not mutated."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


#: dtype codes of the compiled scan (``deltakit_scan_pair`` in pairscan_native.c)
_SCAN_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def scan_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, bool, bool]:
    """``(a finite, b finite, a equals b)`` for two floating tensors, neither mutated.

    The third is ``torch.equal(a, b)`` for tensors of one shape and dtype (False otherwise), and is only
    meaningful when both are finite. For contiguous CPU fp32/bf16/fp16 pairs of one dtype and shape a
    compiled loop reads each element once on the calling thread (three reductions of torch take three
    passes); elsewhere those three reductions run.
    """
    same = a.shape == b.shape and a.dtype == b.dtype
    lib = native_for((a, b), _SCAN_KINDS) if same and a.numel() > 0 else None
    if lib is None:
        return all_finite(a), all_finite(b), same and bool(torch.equal(a, b))
    flags = torch.zeros(3, dtype=torch.int32)
    code = lib.deltakit_scan_pair(
        a.data_ptr(), b.data_ptr(), _SCAN_KINDS[a.dtype], a.numel(), flags.data_ptr()
    )
    if code != 0:
        raise ValueError(f"pair scan kernel refused its arguments (code {code})")
    finite_a, finite_b, equal = (bool(f) for f in flags.tolist())
    return finite_a, finite_b, equal
