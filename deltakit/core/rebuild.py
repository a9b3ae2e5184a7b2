"""Rebuilding one tensor from parts already in memory: the kind dispatch shared by apply and the runtime.

:func:`rebuild` takes what a delta stores for one tensor (its kind, the fine-tune's dtype, the stored
tensors and codec parameters) and the base tensor, and returns the fine-tuned tensor with the same bits as
:meth:`deltakit.core.decode.Decoder.reconstruct`. Encoded tensors whose codec has a factored view and
keeps the generic ``base + decode`` arithmetic (it does not override ``Codec.reconstruct``) go through
the single-pass :func:`deltakit.ops.fused.fused_rebuild`; everything else through the codec.
"""

from __future__ import annotations

from collections.abc import Callable
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
    up, down = view.float_factors
    quantized = view.quantized if up is None else None  # read as codes by the compiled batch
    return FusedWrite(base, dtype, out, view.signs, view.scale, up, down, name, quantized)


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
    as it writes (no second pass); an ``unchanged`` entry is the base's own tensor and is not checked.
    """
    return prepare_reconstruct(decoder, name, base, device, check_finite=check_finite)()


def prepare_reconstruct(
    decoder: Decoder,
    name: str,
    base: torch.Tensor | None,
    device: torch.device | str = "cpu",
    *,
    check_finite: bool = False,
) -> Callable[[], torch.Tensor]:
    """:func:`reconstruct` in two steps: this call does the fused path's many small steps (stored
    tensors read, checked and dequantized, the write checked); the function it returns does the
    arithmetic and returns the tensor.

    On the fused path that function is one compiled call that releases the GIL. Threads that rebuild
    tensors side by side can then take the first step one at a time (Python threads contending for the
    GIL over many small torch calls ran them about half as fast each, docs/speed.md) while the
    arithmetic of several tensors runs in parallel. Other paths (codecs with their own reconstruct,
    tensors not encoded) do all their work in the returned function. Errors about the stored data are
    raised by either step. ``base`` is not mutated.
    """
    entry = decoder.delta.entry(name)
    if entry.kind != ENCODED or entry.extra_rows is not None or not fusable(decoder.codec):

        def whole() -> torch.Tensor:
            value = decoder.reconstruct(name, base, device)
            if check_finite and entry.kind != UNCHANGED:
                require_finite(value, name)
            return value

        return whole
    base = decoder.check_base(name, entry, base).to(device)
    encoded = decoder.encoded(name)
    dtype = dtype_from_name(entry.dtype)
    view = codec_call(name, lambda: factored_view(decoder.codec, encoded))
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    write = fused_write(decoder.codec, ENCODED, dtype, base, view, out, name)
    if write is None:  # the codec's own arithmetic (no factored view, or one of another shape)

        def by_codec() -> torch.Tensor:
            value = codec_call(name, lambda: decoder.codec.reconstruct(encoded, base, dtype, base.device))
            if check_finite:
                require_finite(value, name)
            return value

        return by_codec
    batch = fused_batch([write])

    def fused() -> torch.Tensor:
        batch.run(check_finite=check_finite)
        return out

    return fused


def require_finite(value: torch.Tensor, name: str) -> None:
    """Raise NonFiniteError when floating tensor ``value`` holds NaN or Inf."""
    if not all_finite(value):
        raise NonFiniteError(f"tensor {name}: the rebuilt weights contain NaN or Inf")
