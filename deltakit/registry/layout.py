"""The registry directory: its layout marker, its sub-folders, the keys of ref documents, confinement.

Layout under the registry root::

    registry.json                 layout marker and version
    blobs/sha256/ab/<hex>         every delta file, every manifest, every base file and base file list
    refs/deltas/<name>/<tag>.json {"manifest": "sha256:..."}            (the source of truth, with blobs)
    refs/bases/<name>.json        {"fingerprint": ..., "tree": "sha256:..."}
    refs/evals/<hex>.json         eval results of one delta content (keyed by manifest digest)
    catalog.sqlite                index for ls/show (WAL); rebuilt from refs when missing or damaged
    journal/                      intent records of writes in flight (replayed into the catalog on open)
    cache/deltas|bases/<hex>/     materialised directories handed to apply (hard links to blobs)
    tmp/                          partial writes (removed by gc)
    lock, gate                    inter-process locks (see ``locking``)
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError, RegistryError
from deltakit.registry.fsutil import write_bytes_atomic

LAYOUT = {"format": "deltakit.registry", "format_version": 1}
LAYOUT_FILE = "registry.json"
BASE_TREE_FORMAT = "deltakit.base-tree"
SUBDIRS = ("blobs/sha256", "refs/deltas", "refs/bases", "refs/evals", "journal", "cache", "tmp")
_TOP_LEVEL = ("blobs", "refs", "journal", "cache", "tmp", "lock", "gate", "refs.lock")


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def dumps(obj: Any) -> bytes:
    """The canonical bytes of a registry JSON document (sorted keys, indented, trailing newline)."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def delta_ref_key(name: str, tag: str) -> str:
    """Document key of a delta ref."""
    return f"refs/deltas/{name}/{tag}.json"


def base_ref_key(name: str) -> str:
    """Document key of a base ref."""
    return f"refs/bases/{name}.json"


def eval_key(manifest_hex: str) -> str:
    """Document key of the eval results of one manifest."""
    return f"refs/evals/{manifest_hex}.json"


def confine(root: Path, rel: str) -> Path:
    """``root / rel`` after checking that, with symlinks resolved, it stays inside ``root``.

    rel: a relative POSIX key (``refs/...``, ``blobs/...``, ``cache/...``). Raises FormatError for an
    absolute key, a ``..`` component, or a symlink anywhere on the way that leads out of ``root``.
    """
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or ".." in rel.split("/"):
        raise FormatError(f"unsafe registry path {rel!r}")
    path = root / rel
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise FormatError(f"registry path {rel!r} leads outside {root} (symbolic link?)")
    return path


def init_layout(root: Path) -> None:
    """Create the registry folders and marker under ``root`` (idempotent; refuses a foreign directory)."""
    if root.exists() and not root.is_dir():
        raise RegistryError(f"{root} exists and is not a directory")
    marker = root / LAYOUT_FILE
    if not marker.is_file():
        with contextlib.suppress(FileNotFoundError):
            if any(p.name not in _TOP_LEVEL for p in root.iterdir()):
                raise RegistryError(f"{root} is not empty and is not a deltakit registry")
    for sub in SUBDIRS:
        confine(root, sub).mkdir(parents=True, exist_ok=True)
    if marker.is_file():
        check_layout(root)
    else:
        write_bytes_atomic(marker, dumps(LAYOUT))


def check_layout(root: Path) -> None:
    """Raise RegistryError unless ``root`` holds a registry marker this version reads."""
    try:
        layout = json.loads((root / LAYOUT_FILE).read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise RegistryError(f"{root}: unreadable {LAYOUT_FILE} ({type(exc).__name__})") from None
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT["format"]:
        raise RegistryError(f"{root} is not a deltakit registry")
    version = layout.get("format_version")
    if type(version) is not int:
        raise RegistryError(f"{root}: {LAYOUT_FILE} has no integer format_version")
    if version > LAYOUT["format_version"]:
        raise RegistryError(
            f"{root} has registry format {version}, newer than this deltakit reads "
            f"({LAYOUT['format_version']}); upgrade deltakit"
        )
