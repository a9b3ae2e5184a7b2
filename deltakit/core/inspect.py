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


def allocation_info(entry: TensorEntry) -> dict[str, Any] | None:
    """An encoded tensor's rank, factor bits and (size targets) its allocation: option, predicted and actual
    relative error. None for other kinds."""
    if entry.kind != ENCODED:
        return None
    params = entry.params
    info: dict[str, Any] = {"rank": params.get("rank")}
    factors = params.get("factors")
    if isinstance(factors, dict) and isinstance(factors.get("up"), dict):
        info["bits"] = factors["up"].get("bits")
    elif isinstance(params.get("blocks"), list):
        info["bits"] = "/".join(
            f"{b.get('rank')}@{b.get('bits')}" for b in params["blocks"] if isinstance(b, dict)
        )
    planned = params.get("allocation")
    if isinstance(planned, dict):
        for key in ("option", "predicted_error", "actual_error"):
            info[key] = planned.get(key)
        if "weight" in planned:  # calibration-weighted allocation: the error weight and its input energy
            info["weight"], info["input_energy"] = planned.get("weight"), planned.get("input_energy")
    return info


def tensor_rows(delta: Delta) -> list[dict[str, Any]]:
    """Per tensor: name, kind, role, dtype, shape, stored bytes, ratio to its fp16 delta (encoded only) and
    :func:`allocation_info` (encoded only)."""
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
                "allocation": allocation_info(entry),
            }
        )
    return rows


def inspect_delta(delta: Delta, *, tensors: bool = True) -> dict[str, Any]:
    """:func:`manifest_summary` plus, with ``tensors``, the :func:`tensor_rows` under ``"tensors"``."""
    summary = manifest_summary(delta.manifest)
    if tensors:
        summary["tensors"] = tensor_rows(delta)
    return summary
