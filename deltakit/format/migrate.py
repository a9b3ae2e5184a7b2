"""Reading older manifest versions: each migration turns version N's JSON into version N+1's.

Version 1 -> 2: the ``groups`` table (always one group per encoded tensor, named after it) is folded
into the tensor entries (``params``, ``stored``), and the reserved local names ``value`` (passthrough)
and ``extra_rows`` (grown rows) become fields of the entry.
"""

from __future__ import annotations

from typing import Any

from deltakit.errors import FormatError


def _v1_tensor(name: str, entry: Any, groups: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r} is not an object")
    out = {k: v for k, v in entry.items() if k not in ("group", "stored")}
    stored = entry.get("stored") or {}
    if not isinstance(stored, dict):
        raise ValueError(f"tensor {name!r}: stored is not an object")
    if entry.get("kind") == "passthrough":
        out["value"] = stored.get("value")
    if entry.get("kind") != "encoded":
        return out
    group = groups.get(entry.get("group"))
    if not isinstance(group, dict) or group.get("members") != [name]:
        raise ValueError(f"tensor {name!r}: group {entry.get('group')!r} missing or not one-to-one")
    out["params"], out["stored"] = group.get("params", {}), group.get("stored", {})
    if "extra_rows" in stored:
        out["extra_rows"] = stored["extra_rows"]
    shards = {s for s in (group.get("shard"), entry.get("shard")) if s is not None}
    if len(shards) > 1:
        raise ValueError(f"tensor {name!r}: stored tensors span shards {sorted(shards)}")
    out["shard"] = shards.pop() if shards else None
    return out


def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Version-1 manifest JSON -> version 2 (input not mutated); raises ValueError when malformed."""
    groups = data.get("groups", {})
    tensors = data.get("tensors", {})
    if not isinstance(groups, dict) or not isinstance(tensors, dict):
        raise ValueError("groups and tensors must be objects")
    out = {k: v for k, v in data.items() if k != "groups"}
    out["tensors"] = {name: _v1_tensor(name, entry, groups) for name, entry in tensors.items()}
    out["format_version"] = 2
    return out


MIGRATIONS = {1: v1_to_v2}


def migrate(data: dict[str, Any], source: str = "manifest") -> dict[str, Any]:
    """Bring manifest JSON of any older version up to the current one (one FormatError if malformed)."""
    try:
        while data["format_version"] in MIGRATIONS:
            data = MIGRATIONS[data["format_version"]](data)
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{source}: malformed version-1 manifest ({exc})") from None
    return data
