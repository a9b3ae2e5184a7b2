"""Delta contributions computed from the encoded form, without building the merged weight.

For a linear layer ``y = x Wᵀ`` (``out_in``) or ``y = x W`` (GPT-2 Conv1D, ``in_out``) and a delta
``Δ = α·S + up·down`` (S: ±1 sign matrix; either part may be absent), the delta's share of the output
is ``α·(x Sᵀ) + (x downᵀ) upᵀ`` (``out_in``) or ``α·(x S) + (x up) down`` (``in_out``), in fp32.
The parts come from the codec's :class:`~deltakit.codecs.base.FactoredView` (``op.view``), never from
stored-tensor names.
"""

from __future__ import annotations

import torch

from deltakit.codecs.base import FactoredView
from deltakit.ops.bitpack import unpack_signs
from deltakit.ops.lowrank import low_rank_product
from deltakit.ops.signmm import sign_matmul
from deltakit.runtime.prepared import TensorOp

_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def _view(op: TensorOp) -> FactoredView:
    if op.view is None:
        raise ValueError(f"{op.name}: the codec declares no factored view of this tensor")
    return op.view


def sign_matrix(op: TensorOp, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ±1 sign matrix of ``op``'s view in its stored layout, on the view's device."""
    view = _view(op)
    if view.signs is None:
        raise ValueError(f"{op.name}: the factored view has no sign part")
    return unpack_signs(view.signs, view.shape, view.signs.device).to(dtype)


def gather_sign_rows(packed: torch.Tensor, rows: torch.Tensor, cols: int) -> torch.Tensor:
    """±1 fp32 rows ``rows`` (n,) of a packed (R, cols) sign matrix without unpacking the rest -> (n, cols)."""
    bit = rows.reshape(-1, 1).to(torch.int64) * cols + torch.arange(cols, device=rows.device)  # (n, cols)
    byte = packed[bit >> 3]  # (n, cols) uint8
    value = (byte >> (bit & 7).to(torch.uint8)) & 1
    return value.to(torch.float32) * 2 - 1


def sign_share(x: torch.Tensor, op: TensorOp, layout: str, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``α·(x Sᵀ)`` (``out_in``) or ``α·(x S)`` (``in_out``) for x (..., in) -> fp32 (..., out).

    signs: the unpacked ±1 matrix when the caller caches it (fp32, or the activations' 16-bit dtype,
    in which the product is then taken); else, for ``out_in``, taken from the packed bits
    (:func:`deltakit.ops.signmm.sign_matmul`), or unpacked here in fp32. op not mutated.
    """
    view = _view(op)
    if signs is None and layout == "out_in" and view.signs is not None:
        return sign_matmul(x, view.signs, view.shape).mul_(float(view.scale))
    s = signs if signs is not None else sign_matrix(op)  # (out, in) or (in, out)
    xs = x.to(s.dtype)
    part = xs @ (s.T if layout == "out_in" else s)  # (..., out)
    return part.to(torch.float32).mul_(float(view.scale))


def low_rank_share(x: torch.Tensor, op: TensorOp, layout: str) -> torch.Tensor:
    """``(x downᵀ) upᵀ`` (``out_in``) or ``(x up) down`` (``in_out``): two thin fp32 matmuls -> (..., out)."""
    view = _view(op)
    xf = x.to(torch.float32)
    up = view.up.to(torch.float32)  # (rows, r)
    down = view.down.to(torch.float32)  # (r, cols)
    return (xf @ down.T) @ up.T if layout == "out_in" else (xf @ up) @ down


def linear_delta(
    x: torch.Tensor, op: TensorOp, layout: str, signs: torch.Tensor | None = None
) -> torch.Tensor:
    """The delta's share of a linear layer's output for inputs ``x`` (..., in) -> fp32 (..., out).

    signs: the unpacked ±1 matrix when the caller caches it (else unpacked here); op not mutated.
    """
    view = _view(op)
    out: torch.Tensor | None = None
    if view.signs is not None:
        out = sign_share(x, op, layout, signs)
    if view.has_low_rank:
        part = low_rank_share(x, op, layout)
        out = part if out is None else out.add_(part)
    assert out is not None  # a FactoredView has a sign part, factors or both
    return out


def embedding_delta(ids: torch.Tensor, op: TensorOp) -> torch.Tensor:
    """The delta's share of an embedding lookup: ``Δ[ids]`` for ids (...,) -> fp32 (..., dim)."""
    view = _view(op)
    _rows, cols = view.shape
    flat = ids.reshape(-1)
    out = torch.zeros(flat.numel(), cols, dtype=torch.float32, device=ids.device)
    if view.signs is not None:
        out += gather_sign_rows(view.signs, flat, cols) * float(view.scale)
    if view.has_low_rank:
        out += low_rank_product(view.up[flat], view.down)  # (n, cols): the merged weight's rows, bit for bit
    return out.reshape(*ids.shape, cols)
