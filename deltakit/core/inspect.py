"""What ``inspect`` shows about a delta: the summary and one row per tensor (JSON-able)."""

from __future__ import annotations

import math
from typing import Any

from deltakit.format.delta import Delta
from deltakit.format.manifest import ENCODED, Manifest, TensorEntry


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """Codec, identities, format version, tensor kinds, stats and file sizes of a delta."""
    return {
        "codec": manifest.codec.name,
        "codec_version": manifest.codec.version,
        "config": manifest.codec.config,
        "budget": manifest.codec.budget,
        "base": {"name": manifest.base.name, "fingerprint": manifest.base.fingerprint},
        "target": {"name": manifest.target.name, "fingerprint": manifest.target.fingerprint},
        "format_version": manifest.format_version,
        "tensor_kinds": manifest.kind_counts(),
        "stats": manifest.stats,
        "files": {k: v.size for k, v in manifest.files.items()},
    }


def _stored_bytes(delta: Delta, entry: TensorEntry) -> int:
    keys = [*entry.stored.values(), *(k for k in (entry.value, entry.extra_rows) if k is not None)]
    tensors = [delta.stored_tensor(key, entry.shard) for key in keys]
    return sum(t.numel() * t.element_size() for t in tensors)


def tensor_rows(delta: Delta) -> list[dict[str, Any]]:
    """Per tensor: name, kind, role, dtype, shape, stored bytes and ratio to its fp16 delta (encoded only)."""
    rows = []
    for name, entry in delta.manifest.tensors.items():
        stored = _stored_bytes(delta, entry)
        fp16 = 2 * math.prod(entry.shared_shape) if entry.kind == ENCODED else 0
        rows.append(
            {
                "name": name,
                "kind": entry.kind,
                "role": entry.role,
                "dtype": entry.dtype,
                "shape": entry.shape,
                "stored_bytes": stored,
                "ratio": stored / fp16 if fp16 else None,
            }
        )
    return rows


def inspect_delta(delta: Delta, *, tensors: bool = True) -> dict[str, Any]:
    """:func:`manifest_summary` plus, with ``tensors``, the :func:`tensor_rows` under ``"tensors"``."""
    summary = manifest_summary(delta.manifest)
    if tensors:
        summary["tensors"] = tensor_rows(delta)
    return summary
