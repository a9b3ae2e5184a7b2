"""The delta manifest (``manifest.json``): what a delta holds and how to check it.

Layout (format version 1)::

    {"format": "deltakit.delta", "format_version": 1, "deltakit_version": "0.1.0", "created": "...",
     "codec": {"name", "version", "config", "budget": {"ratio", "rank"}},
     "base":   {"name", "fingerprint"},     # fingerprint = sha256 over names, dtypes, shapes, bytes
     "target": {"name", "fingerprint"},
     "tensors": {NAME: {"kind": "unchanged" | "encoded" | "passthrough", "dtype", "shape", "role",
                        "group"?, "base_shape"?, "stored"?: {local: key}, "shard"?}},
     "groups":  {GROUP: {"members": [NAME...], "params": {...}, "stored": {local: key}, "shard"}},
     "removed": [NAME...],                  # base tensors the fine-tune does not have
     "aux_files": {FILE: {"source": "base" | "delta", "sha256", "size"}},
     "files":   {RELPATH: {"sha256", "size"}},   # every file of the delta but manifest.json
     "stats":   {"stored_bytes", "fp16_delta_bytes", "ratio", ...}}

``unchanged`` tensors cost nothing; ``passthrough`` tensors are stored exactly (vectors, tensors the
base lacks); an ``encoded`` tensor whose rows grew (resized vocabulary) stores the new rows exactly
under the local name ``extra_rows``. Readers accept unknown keys with a warning, and refuse a newer
major format version or an unknown format name.
"""

from __future__ import annotations

import datetime as _dt
import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from deltakit._version import __version__
from deltakit.errors import FormatError

FORMAT_NAME = "deltakit.delta"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

UNCHANGED, ENCODED, PASSTHROUGH = "unchanged", "encoded", "passthrough"
TENSOR_KINDS = (UNCHANGED, ENCODED, PASSTHROUGH)


@dataclass
class ModelIdentity:
    name: str
    fingerprint: str


@dataclass
class CodecInfo:
    name: str
    version: int
    config: dict[str, Any]
    budget: dict[str, Any]


@dataclass
class Manifest:
    codec: CodecInfo
    base: ModelIdentity
    target: ModelIdentity
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    aux_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    deltakit_version: str = __version__
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        order = [
            "format",
            "format_version",
            "deltakit_version",
            "created",
            "codec",
            "base",
            "target",
            "stats",
            "files",
            "aux_files",
            "removed",
            "groups",
            "tensors",
        ]
        return {key: data[key] for key in order}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise FormatError(f"{source}: not a JSON object")
        fmt = data.get("format")
        if fmt != FORMAT_NAME:
            raise FormatError(f"{source}: not a deltakit delta (format {fmt!r}, expected {FORMAT_NAME!r})")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise FormatError(f"{source}: format_version missing or not an integer")
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{source}: format version {version} is newer than this deltakit reads ({FORMAT_VERSION}); "
                "upgrade deltakit"
            )
        known = {
            "format",
            "format_version",
            "deltakit_version",
            "created",
            "codec",
            "base",
            "target",
            "tensors",
            "groups",
            "removed",
            "aux_files",
            "files",
            "stats",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown manifest key(s): {', '.join(unknown)}", stacklevel=2)
        try:
            return cls(
                codec=_section(CodecInfo, data["codec"], "codec", source),
                base=_section(ModelIdentity, data["base"], "base", source),
                target=_section(ModelIdentity, data["target"], "target", source),
                tensors=data.get("tensors", {}),
                groups=data.get("groups", {}),
                removed=data.get("removed", []),
                aux_files=data.get("aux_files", {}),
                files=data.get("files", {}),
                stats=data.get("stats", {}),
                format=fmt,
                format_version=version,
                deltakit_version=data.get("deltakit_version", "unknown"),
                created=data.get("created", ""),
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"{source}: malformed manifest ({exc})") from None

    @classmethod
    def read(cls, delta_dir: Path | str) -> Manifest:
        path = Path(delta_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FormatError(f"{delta_dir} is not a delta directory (no {MANIFEST_NAME})")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, str(path))


def _section(cls: type, values: Any, key: str, source: str) -> Any:
    """Build a manifest section dataclass; unknown keys (from a newer minor writer) warn and are dropped."""
    if not isinstance(values, dict):
        raise TypeError(f"{key} is not an object")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown {key} key(s): {', '.join(unknown)}", stacklevel=3)
    return cls(**{k: v for k, v in values.items() if k in known})
