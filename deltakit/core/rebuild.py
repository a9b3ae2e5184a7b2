"""Rebuilding one tensor from parts already in memory: the kind dispatch shared by apply and the runtime.

:func:`rebuild` takes what a delta stores for one tensor (its kind, the fine-tune's dtype, the stored
tensors and codec parameters) and the base tensor, and returns the fine-tuned tensor with the same bits as
:meth:`deltakit.core.decode.Decoder.reconstruct`. Encoded tensors whose codec has a factored view and
keeps the generic ``base + decode`` arithmetic (it does not override ``Codec.reconstruct``) go through
the single-pass :func:`deltakit.ops.fused.fused_rebuild`; everything else through the codec.
"""

from __future__ import annotations

from typing import Any

import torch

from deltakit.codecs.base import Codec, Encoded, FactoredView
from deltakit.core.decode import Decoder, codec_call
from deltakit.errors import FormatError, NonFiniteError
from deltakit.format.manifest import ENCODED, PASSTHROUGH, UNCHANGED
from deltakit.format.safetensors_io import dtype_from_name
from deltakit.ops.finite import all_finite
from deltakit.ops.fused import fused_rebuild
from deltakit.ops.fused_batch import FusedBatch, FusedWrite


def fusable(codec: Codec) -> bool:
    """Whether the codec's rebuilt weight is the generic ``cast(base + decode)`` (no own reconstruct)."""
    return type(codec).reconstruct is Codec.reconstruct


def factored_view(codec: Codec, encoded: Encoded) -> FactoredView | None:
    """The codec's factored view when the fused path computes its reconstruct exactly, else None."""
    if not fusable(codec):
        return None
    view = codec.factored(encoded)
    return view if view is not None and len(view.shape) == 2 else None


def rebuild(
    codec: Codec,
    kind: str,
    dtype: torch.dtype,
    tensors: dict[str, torch.Tensor],
    params: dict[str, Any],
    base: torch.Tensor,
    *,
    view: FactoredView | None = None,
    out: torch.Tensor | None = None,
    check_finite: bool | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """The fine-tuned tensor of one entry, on ``base``'s device.

    kind: ``passthrough`` (``tensors["value"]`` is the tensor), ``unchanged`` or ``encoded``. view: the
    codec's factored view of ``(tensors, params)`` when the caller has it (looked up otherwise).
    out: written in place by the fused path and returned; other paths return a new tensor and leave
    ``out`` alone. check_finite: whether the fused path checks every value is finite (raising
    NonFiniteError naming ``name``); default: when it writes into ``out``. base is not mutated.
    """
    if kind == PASSTHROUGH:
        return tensors["value"].to(base.device).to(dtype)
    if kind == UNCHANGED:
        return base.to(dtype)
    if kind != ENCODED:
        raise ValueError(f"{name}: unknown tensor kind {kind!r}")
    encoded = Encoded(tensors, params)
    if view is None or not fusable(codec):
        view = codec_call(name, lambda: factored_view(codec, encoded))
    if view is None or tuple(view.shape) != tuple(base.shape):
        return codec_call(name, lambda: codec.reconstruct(encoded, base, dtype, base.device))
    try:
        return fused_rebuild(
            base,
            dtype,
            signs=view.signs,
            scale=view.scale,
            up=view.up,
            down=view.down,
            out=out,
            check_finite=out is not None if check_finite is None else check_finite,
            name=name,
        )
    except ValueError as exc:  # parts that do not fit the base (fused_rebuild checks before any write)
        raise FormatError(str(exc).splitlines()[0][:240]) from None  # the message names the tensor


def fused_write(
    codec: Codec,
    kind: str,
    dtype: torch.dtype,
    base: torch.Tensor,
    view: FactoredView | None,
    out: torch.Tensor,
    name: str = "tensor",
) -> FusedWrite | None:
    """The single-pass write :func:`rebuild` would make into ``out`` for an entry with this ``view`` (the
    codec's factored view), or None when it would take another path. Nothing is checked or written yet:
    :func:`fused_batch` checks, and its ``run`` writes."""
    if kind != ENCODED or view is None or not fusable(codec) or base.dim() != 2:
        return None
    if tuple(view.shape) != tuple(base.shape):
        return None
    return FusedWrite(base, dtype, out, view.signs, view.scale, view.up, view.down, name)


def fused_batch(writes: list[FusedWrite]) -> FusedBatch:
    """The writes of :func:`fused_write` checked and ready to run together (:class:`FusedBatch`: the
    compiled ones in one call, the bits :func:`rebuild` writes). Parts that do not fit their base are a
    FormatError naming the tensor; nothing is written."""
    try:
        return FusedBatch(writes)
    except ValueError as exc:
        raise FormatError(str(exc).splitlines()[0][:240]) from None


def reconstruct(
    decoder: Decoder,
    name: str,
    base: torch.Tensor | None,
    device: torch.device | str = "cpu",
    *,
    check_finite: bool = False,
) -> torch.Tensor:
    """:meth:`Decoder.reconstruct` of tensor ``name``, through the fused path where it applies.

    check_finite: raise NonFiniteError when the rebuilt tensor holds NaN or Inf. The fused path checks
    tile by tile as it writes (no second pass); an ``unchanged`` entry is the base's own tensor and is
    not checked.
    """
    entry = decoder.delta.entry(name)
    if entry.kind != ENCODED or entry.extra_rows is not None or not fusable(decoder.codec):
        value = decoder.reconstruct(name, base, device)
        if check_finite and entry.kind != UNCHANGED:
            require_finite(value, name)
        return value
    base = decoder.check_base(name, entry, base).to(device)
    encoded = decoder.encoded(name)
    dtype = dtype_from_name(entry.dtype)
    out = torch.empty(base.shape, dtype=dtype, device=base.device) if check_finite else None
    value = rebuild(decoder.codec, ENCODED, dtype, encoded.tensors, encoded.params, base, out=out, name=name)
    if check_finite and value is not out:  # not the fused path: no tile check was made
        require_finite(value, name)
    return value


def require_finite(value: torch.Tensor, name: str) -> None:
    """Raise NonFiniteError when floating tensor ``value`` holds NaN or Inf."""
    if not all_finite(value):
        raise NonFiniteError(f"tensor {name}: the rebuilt weights contain NaN or Inf")
