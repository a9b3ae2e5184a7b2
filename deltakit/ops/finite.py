"""Whether a tensor holds only finite values, in one reduction pass.

``torch.isfinite(t).all()`` materialises a boolean tensor of t's size first; on CPU fp16 tensors it is
also unvectorised (about 24x slower than the reduction here on a 3.5 M-value fp16 tensor). ``aminmax``
propagates NaN and keeps ±Inf, so the two extremes are finite exactly when every value is.
"""

from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when floating ``tensor`` holds no NaN or Inf (always true for other dtypes and for empty
    tensors). Not mutated."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))
