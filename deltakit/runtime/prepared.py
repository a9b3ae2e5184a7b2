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

from deltakit.codecs.base import Codec, Encoded
from deltakit.errors import TensorMismatchError
from deltakit.format.delta import Delta
from deltakit.format.manifest import ENCODED, PASSTHROUGH
from deltakit.format.safetensors_io import dtype_from_name

#: codecs whose encoded form the batched path uses directly (sign bits x scale, low-rank factors)
FACTORED_CODECS = frozenset({"dqrelo", "bitdelta", "svd"})


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class TensorOp:
    """What one delta does to one parameter.

    kind: ``encoded`` (tensors are the codec's: ``signs`` packed uint8, ``up`` (rows, r), ``down``
    (r, cols) ...) or ``passthrough`` (``tensors["value"]`` is the exact fine-tuned tensor).
    dtype: the fine-tune's dtype for this tensor (what ``deltakit.apply`` writes).
    layout: ``out_in`` (nn.Linear) or ``in_out`` (GPT-2 Conv1D) as recorded in the manifest.
    """

    name: str  # canonical parameter name
    kind: str
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)
    layout: str = "out_in"

    @property
    def nbytes(self) -> int:
        return _nbytes(self.tensors)

    def encoded(self) -> Encoded:
        return Encoded(self.tensors, self.params)

    def to(self, device: torch.device, *, pin: bool = False, non_blocking: bool = False) -> TensorOp:
        """A copy with tensors on ``device`` (pinned host memory when ``pin``); self is not mutated."""
        moved = {}
        for key, tensor in self.tensors.items():
            if pin:
                moved[key] = tensor.contiguous().pin_memory()
            else:
                moved[key] = tensor.to(device, non_blocking=non_blocking)
        return TensorOp(self.name, self.kind, self.dtype, moved, self.params, self.layout)


@dataclass
class PreparedDelta:
    """A delta's per-parameter operations (keyed by canonical parameter name) and its codec."""

    name: str
    codec: Codec
    base_fingerprint: str
    ops: dict[str, TensorOp]

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops.values())

    @property
    def factored(self) -> bool:
        """Whether the batched path can use the encoded tensors directly."""
        return self.codec.name in FACTORED_CODECS

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
    ops: dict[str, TensorOp] = {}
    for tname, entry in manifest.tensors.items():
        kind = entry["kind"]
        if kind not in (ENCODED, PASSTHROUGH):
            continue
        if kind == PASSTHROUGH and not entry.get("in_base", False):
            raise TensorMismatchError(
                f"delta {name!r} adds tensor {tname!r} that the base lacks; the runtime serves the base's "
                "architecture only: materialise it with `deltakit apply`"
            )
        stored = entry.get("stored", {})
        if "extra_rows" in stored or tuple(entry.get("base_shape", entry["shape"])) != tuple(entry["shape"]):
            raise TensorMismatchError(
                f"delta {name!r} grows {tname!r} to {entry['shape']} (resized vocabulary); the resident base "
                "cannot change shape in place: materialise it with `deltakit apply`"
            )
        canonical = resolve(tname)
        if canonical in ops:
            warnings.warn(
                f"delta {name!r}: {tname!r} is tied to {canonical!r}, which it also changes; keeping the first entry",
                stacklevel=2,
            )
            continue
        dtype = dtype_from_name(entry["dtype"])
        layout = entry.get("layout", "out_in")
        if kind == PASSTHROUGH:
            value = delta._stored_tensor(stored["value"], entry.get("shard")).contiguous()
            ops[canonical] = TensorOp(canonical, kind, dtype, {"value": value}, {}, layout)
        else:
            encoded = delta.encoded(entry["group"])
            tensors = {k: v.contiguous() for k, v in encoded.tensors.items()}
            ops[canonical] = TensorOp(canonical, kind, dtype, tensors, dict(encoded.params), layout)
    return PreparedDelta(name, delta.codec, manifest.base.fingerprint, ops)
