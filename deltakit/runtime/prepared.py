"""A delta in the form the runtime keeps in its caches: per-parameter encoded tensors, no dense weights.

:func:`prepare_delta` reads every stored tensor of a :class:`~deltakit.format.delta.Delta` once and keys
it by the served model's canonical parameter name. Deltas the resident model cannot take in place are
refused with a message naming why (grown vocabulary, tensors the base lacks, removed tensors).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from deltakit.codecs.base import Codec, Encoded, FactoredView
from deltakit.core.decode import Decoder, codec_call
from deltakit.errors import TensorMismatchError
from deltakit.format.delta import Delta
from deltakit.format.manifest import ENCODED, PASSTHROUGH, TensorEntry
from deltakit.format.safetensors_io import dtype_from_name


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _view_extra_nbytes(view: FactoredView | None, stored: dict[str, torch.Tensor]) -> int:
    """Bytes of ``view``'s tensors held besides the stored ones (those sharing a stored tensor's memory,
    such as fp16 factors or the packed signs, count nothing)."""
    if view is None:
        return 0
    shared = {t.untyped_storage().data_ptr() for t in stored.values()}
    parts = (view.signs, *view.float_factors)
    return sum(
        t.numel() * t.element_size()
        for t in parts
        if t is not None and t.untyped_storage().data_ptr() not in shared
    )


@dataclass
class TensorOp:
    """What one delta does to one parameter.

    kind: ``encoded`` (tensors and params are the codec's; ``view`` is its factored view when it declares
    one) or ``passthrough`` (``tensors["value"]`` is the exact fine-tuned tensor).
    dtype: the fine-tune's dtype for this tensor (what ``deltakit.apply`` writes).
    layout: ``out_in`` (nn.Linear) or ``in_out`` (GPT-2 Conv1D) as recorded in the manifest.
    """

    name: str  # canonical parameter name
    kind: str
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    layout: str = "out_in"
    #: the codec's factored view of an encoded op (sharing ``tensors``), None when it has none
    view: FactoredView | None = None

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the stored tensors: what the delta's shards hold for this op."""
        return _nbytes(self.tensors)

    @property
    def nbytes(self) -> int:
        """Bytes this op holds in memory: its stored tensors and the view's tensors that are not among
        them (on the CPU a view of group-quantized factors holds their codes only; a copy on another
        device holds them dequantized to fp32, about 8x the bytes of 4-bit codes)."""
        return _nbytes(self.tensors) + _view_extra_nbytes(self.view, self.tensors)

    def encoded(self) -> Encoded:
        return Encoded(self.tensors, self.params)

    def to(self, device: torch.device, *, pin: bool = False, non_blocking: bool = False) -> TensorOp:
        """A copy with tensors on ``device`` (pinned host memory when ``pin``); self is not mutated."""
        moved_by_id: dict[int, torch.Tensor] = {}

        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if id(tensor) not in moved_by_id:
                out = (
                    tensor.contiguous().pin_memory() if pin else tensor.to(device, non_blocking=non_blocking)
                )
                moved_by_id[id(tensor)] = out
            return moved_by_id[id(tensor)]

        moved = {key: move(tensor) for key, tensor in self.tensors.items()}
        view = self.view
        if view is not None:
            # quantized factors stay codes on the CPU (its kernels read them); elsewhere they travel
            # dequantized to fp32
            cpu = torch.device(device).type == "cpu"
            up, down = view.float_factors if cpu else (view.up, view.down)
            quantized = view.quantized if cpu else None
            view = FactoredView(view.shape, move(view.signs), view.scale, move(up), move(down), quantized)
        return TensorOp(self.name, self.kind, self.dtype, moved, self.params, self.layout, view)


@dataclass
class PreparedDelta:
    """A delta's per-parameter operations (keyed by canonical parameter name) and its codec."""

    name: str
    codec: Codec
    base_fingerprint: str
    ops: dict[str, TensorOp]
    #: every op of this copy was rebuilt onto the served base and found finite (copies start unchecked)
    checked: bool = False
    #: the runtime's swap plan for this copy (its checked single-pass writes), kept for the next swap
    swap_plan: object | None = field(default=None, repr=False, compare=False)

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the stored tensors (read from the delta's shards)."""
        return sum(op.stored_nbytes for op in self.ops.values())

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (:attr:`TensorOp.nbytes`): what the caches count against their budgets and
        what a copy to another device moves."""
        return sum(op.nbytes for op in self.ops.values())

    @property
    def factored(self) -> bool:
        """Whether the batched path can use the encoded form directly: every encoded op has a factored
        view (the codec declares one through :meth:`~deltakit.codecs.base.Codec.factored`)."""
        return all(op.view is not None for op in self.ops.values() if op.kind == ENCODED)

    def to(self, device: torch.device, *, pin: bool = False, non_blocking: bool = False) -> PreparedDelta:
        ops = {k: op.to(device, pin=pin, non_blocking=non_blocking) for k, op in self.ops.items()}
        return PreparedDelta(self.name, self.codec, self.base_fingerprint, ops)


def prepare_delta(name: str, delta: Delta, resolve) -> PreparedDelta:
    """Read ``delta``'s stored tensors (CPU) into a :class:`PreparedDelta`.

    resolve: maps a checkpoint tensor name to the served model's canonical parameter name (raises for
    unknown names). Tied names resolving to one parameter keep the first changed entry.
    """
    manifest = delta.manifest
    if manifest.removed:
        raise TensorMismatchError(
            f"delta {name!r} removes {len(manifest.removed)} base tensor(s) (e.g. {manifest.removed[0]}); "
            "the hot-swap runtime cannot remove parameters: materialise it with `deltakit apply`"
        )
    decoder = Decoder.of(delta)
    ops: dict[str, TensorOp] = {}
    for tname, entry in manifest.tensors.items():
        if entry.kind not in (ENCODED, PASSTHROUGH):
            continue
        _check_servable(name, tname, entry)
        canonical = resolve(tname)
        if canonical in ops:
            warnings.warn(
                f"delta {name!r}: {tname!r} is tied to {canonical!r}, which it also changes; keeping the first entry",
                stacklevel=2,
            )
            continue
        ops[canonical] = _op(decoder, tname, canonical, entry)
    return PreparedDelta(name, decoder.codec, manifest.base.fingerprint, ops)


def _check_servable(name: str, tname: str, entry: TensorEntry) -> None:
    """Refuse entries the resident base cannot take in place (new tensors, grown rows)."""
    if not entry.needs_base:
        raise TensorMismatchError(
            f"delta {name!r} adds tensor {tname!r} that the base lacks; the runtime serves the base's "
            "architecture only: materialise it with `deltakit apply`"
        )
    if entry.extra_rows is not None or entry.shared_shape != entry.shape:
        raise TensorMismatchError(
            f"delta {name!r} grows {tname!r} to {entry.shape} (resized vocabulary); the resident base "
            "cannot change shape in place: materialise it with `deltakit apply`"
        )


def _op(decoder: Decoder, tname: str, canonical: str, entry: TensorEntry) -> TensorOp:
    """The op of one encoded or passthrough entry, with the codec's factored view when it has one."""
    dtype = dtype_from_name(entry.dtype)
    layout = entry.layout or "out_in"
    if entry.kind == PASSTHROUGH:
        value = decoder.delta.exact(tname).contiguous()
        return TensorOp(canonical, entry.kind, dtype, {"value": value}, {}, layout)
    encoded = decoder.encoded(tname)
    encoded = Encoded({k: v.contiguous() for k, v in encoded.tensors.items()}, dict(encoded.params))
    view = codec_call(tname, lambda: decoder.codec.factored(encoded))
    return TensorOp(canonical, entry.kind, dtype, encoded.tensors, encoded.params, layout, view)
