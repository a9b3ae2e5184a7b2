"""The few manifest fields the registry relies on, checked with the format layer's path rules.

The registry treats a manifest as opaque bytes (stored as a blob, byte for byte) and reads only:
``format``, ``files`` (path -> sha256/size), and the descriptive fields it catalogs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError
from deltakit.format.paths import MANIFEST_NAME as MANIFEST_NAME  # re-exported for the registry
from deltakit.format.paths import check_relpath as check_relpath  # re-exported: one path check
from deltakit.registry.jsondoc import parse_object

MAX_FILE_BYTES = 1 << 50
_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class FileEntry:
    """One file of a delta: relative POSIX path, hex sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


def check_file_entry(path: str, entry: object, where: str, *, allow_manifest: bool = False) -> FileEntry:
    """Validate one ``files`` entry ``{"sha256": <64 lowercase hex>, "size": <int >= 0>}`` and its path."""
    check_relpath(path, allow_manifest=allow_manifest)
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("sha256"), str)
        or not _HEX.fullmatch(entry["sha256"])
        or type(entry.get("size")) is not int
        or not 0 <= entry["size"] <= MAX_FILE_BYTES
    ):
        raise FormatError(f"{where}: file {path!r} needs a hex 'sha256' and a non-negative integer 'size'")
    return FileEntry(path, entry["sha256"], entry["size"])


def parse_manifest(data: bytes, where: str = "manifest") -> dict[str, Any]:
    """Parse manifest bytes and check the fields the registry needs; raise FormatError otherwise.

    Checked: a JSON object without duplicate keys, ``format`` 'deltakit.delta', and ``files`` mapping
    safe relative paths (:func:`check_relpath`) to valid entries (:func:`check_file_entry`).
    """
    manifest = parse_object(data, where)
    if manifest.get("format") != "deltakit.delta":
        raise FormatError(f"{where}: not a deltakit delta manifest (expected format 'deltakit.delta')")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise FormatError(f"{where}: 'files' must map relative paths to {{sha256, size}}")
    for path, entry in files.items():
        check_file_entry(path, entry, where)
    return manifest


def file_entries(manifest: dict[str, Any]) -> list[FileEntry]:
    """The manifest's files, sorted by path."""
    return [
        FileEntry(path, entry["sha256"], entry["size"]) for path, entry in sorted(manifest["files"].items())
    ]


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file below ``root``, hidden files and folders excluded."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.is_symlink():
            raise FormatError(f"{path}: symbolic links are not stored in the registry")
        if path.is_file():
            out.append(rel.as_posix())
    return out


def _get(manifest: dict[str, Any], *keys: str) -> Any:
    node: Any = manifest
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _typed(value: Any, *kinds: type) -> Any:
    """``value`` if it is one of ``kinds`` (bool never counts as a number), else None."""
    if isinstance(value, bool) or not isinstance(value, kinds):
        return None
    if isinstance(value, int) and abs(value) > MAX_FILE_BYTES:
        return None  # SQLite integers are 64-bit
    return value


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """Catalog fields of a manifest: codec, base/target identities and sizes.

    Descriptive fields of the wrong type (a codec name that is not a string, a ratio that is not a
    number...) are catalogued as None: they do not make the delta unreadable, and never reach SQLite.
    """
    entries = file_entries(manifest)
    stored = _typed(_get(manifest, "stats", "stored_bytes"), int)
    ratio = _typed(_get(manifest, "stats", "ratio"), int, float)
    return {
        "codec": _typed(_get(manifest, "codec", "name"), str),
        "codec_version": _typed(_get(manifest, "codec", "version"), int),
        "ratio": ratio or _typed(_get(manifest, "codec", "budget", "ratio"), int, float),
        "base_name": _typed(_get(manifest, "base", "name"), str),
        "base_fingerprint": _typed(_get(manifest, "base", "fingerprint"), str),
        "target_name": _typed(_get(manifest, "target", "name"), str),
        "target_fingerprint": _typed(_get(manifest, "target", "fingerprint"), str),
        "stored_bytes": stored if stored is not None else sum(e.size for e in entries),
        "fp16_delta_bytes": _typed(_get(manifest, "stats", "fp16_delta_bytes"), int),
        "total_bytes": sum(e.size for e in entries),
        "n_files": len(entries),
    }
