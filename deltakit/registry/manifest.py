"""The few manifest fields the registry relies on, checked without importing the format package.

The registry treats a manifest as opaque bytes (stored as a blob, byte for byte) and reads only:
``format``, ``files`` (path -> sha256/size), and the descriptive fields it catalogs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError

MANIFEST_NAME = "manifest.json"
_HEX = re.compile(r"^[0-9a-f]{64}$")
_SAFE_PART = re.compile(r"^[^\x00-\x1f\x7f\\:]+$")


@dataclass(frozen=True)
class FileEntry:
    """One file of a delta: relative POSIX path, hex sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path (no ``..``, no absolute, no control chars)."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or any(p in ("", ".", "..") or not _SAFE_PART.match(p) for p in parts)
        or path == MANIFEST_NAME
    ):
        raise FormatError(f"manifest lists an unsafe or reserved file path {path!r}")
    return path


def parse_manifest(data: bytes, where: str = "manifest") -> dict[str, Any]:
    """Parse manifest bytes and check the fields the registry needs; raise FormatError otherwise."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "deltakit.delta":
        raise FormatError(f"{where}: not a deltakit delta manifest (expected format 'deltakit.delta')")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise FormatError(f"{where}: 'files' must map relative paths to {{sha256, size}}")
    for path, entry in files.items():
        check_relpath(path)
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _HEX.match(entry["sha256"])
            or not isinstance(entry.get("size"), int)
            or entry["size"] < 0
        ):
            raise FormatError(
                f"{where}: file {path!r} needs a hex 'sha256' and a non-negative integer 'size'"
            )
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


def summarize(manifest: dict[str, Any]) -> dict[str, Any]:
    """Catalog fields of a manifest: codec, base/target identities and sizes (missing ones are None)."""
    entries = file_entries(manifest)
    stored = _get(manifest, "stats", "stored_bytes")
    return {
        "codec": _get(manifest, "codec", "name"),
        "codec_version": _get(manifest, "codec", "version"),
        "ratio": _get(manifest, "stats", "ratio") or _get(manifest, "codec", "budget", "ratio"),
        "base_name": _get(manifest, "base", "name"),
        "base_fingerprint": _get(manifest, "base", "fingerprint"),
        "target_name": _get(manifest, "target", "name"),
        "target_fingerprint": _get(manifest, "target", "fingerprint"),
        "stored_bytes": stored if isinstance(stored, int) else sum(e.size for e in entries),
        "fp16_delta_bytes": _get(manifest, "stats", "fp16_delta_bytes"),
        "total_bytes": sum(e.size for e in entries),
        "n_files": len(entries),
    }
