"""Bringing files into the blob store: delta directories and checkpoint directories, checked on the way.

A delta directory must hold exactly the files its manifest lists (no symlinks, no stray files), each
matching its recorded sha256 and size. Also: cleaning what an interrupted replace of an output left.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from deltakit.errors import FormatError, IntegrityError
from deltakit.format.atomic import pid_alive
from deltakit.registry.blobstore import LocalBlobStore
from deltakit.registry.fsutil import file_sha256
from deltakit.registry.layout import BASE_TREE_FORMAT, dumps
from deltakit.registry.manifest import MANIFEST_NAME, file_entries, list_files, parse_manifest


def store_checkpoint(store: LocalBlobStore, model_dir: Path, files: list[str], fingerprint: str) -> str:
    """Store every file of a checkpoint and its file list; return the list's ``sha256:`` digest."""
    entries = {}
    for rel in files:
        digest = file_sha256(model_dir / rel)
        store.put_file(model_dir / rel, digest)
        entries[rel] = {"sha256": digest, "size": store.size(digest)}
    tree = {"format": BASE_TREE_FORMAT, "format_version": 1, "fingerprint": fingerprint, "files": entries}
    return "sha256:" + store.put_bytes(dumps(tree))


def read_delta_dir(delta_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """Manifest bytes and content of a delta directory whose files are exactly those it lists."""
    mpath = delta_dir / MANIFEST_NAME
    if not mpath.is_file() or mpath.is_symlink():
        raise FormatError(f"{delta_dir} is not a delta directory: no {MANIFEST_NAME}")
    manifest_bytes = mpath.read_bytes()
    manifest = parse_manifest(manifest_bytes, str(mpath))
    on_disk = set(list_files(delta_dir)) - {MANIFEST_NAME}
    listed = {e.path for e in file_entries(manifest)}
    if on_disk != listed:
        missing, extra = sorted(listed - on_disk), sorted(on_disk - listed)
        raise FormatError(
            f"{delta_dir}: files differ from the manifest (missing: {missing or 'none'}; "
            f"not in manifest: {extra or 'none'})"
        )
    return manifest_bytes, manifest


def put_delta_file(store: LocalBlobStore, delta_dir: Path, rel: str, digest: str, size: int) -> None:
    """Store one delta file after checking it stays inside ``delta_dir`` and matches its manifest entry."""
    src = delta_dir / rel
    if not src.resolve().is_relative_to(delta_dir.resolve()):
        raise FormatError(f"{src} leads outside the delta directory")
    actual = src.stat().st_size
    if actual != size:
        raise IntegrityError(f"{src}: size {actual} differs from the manifest's {size} (truncated?)")
    try:
        store.put_file(src, digest)
    except IntegrityError:
        raise IntegrityError(f"{src} does not match the sha256 its manifest records (corrupted)") from None


def remove_replace_leftovers(final: Path) -> None:
    """Remove ``.NAME.old-<pid>-<hex>`` directories left by a replace whose process died."""
    if not final.parent.is_dir():
        return
    for stale in final.parent.glob(f".{final.name}.old-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)) and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
