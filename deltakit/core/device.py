"""Choosing the compute device from a user's ``--device`` value."""

from __future__ import annotations

import torch

from deltakit.errors import UsageError


def resolve_device(device: str | torch.device) -> torch.device:
    """``cpu``/``cuda``/``cuda:N`` -> torch.device; asking for CUDA without one is an error."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"invalid device {device!r}; choose cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device}: no CUDA device is available here; use device=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {device!r}; choose cpu or cuda")
    return dev
