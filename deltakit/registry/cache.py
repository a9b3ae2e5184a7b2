"""Materialised directories under ``cache/``: what ``resolve_delta`` and ``resolve_base`` hand to apply.

A cache directory ``cache/<kind>/<hex>/`` holds one hard link per blob (a copy where links fail),
named by the relative paths of the delta or base. It is built in ``tmp/`` and renamed into place, so
it appears whole; a damaged one is rebuilt from the blobs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deltakit.errors import IntegrityError, NotFoundError
from deltakit.registry.blobstore import LocalBlobStore, check_digest
from deltakit.registry.fsutil import file_sha256, fsync_dir, temp_path
from deltakit.registry.layout import confine
from deltakit.registry.manifest import check_relpath

#: relative path -> (hex sha256, size in bytes)
Entries = dict[str, tuple[str, int]]


def check_dir(root: Path, entries: Entries, *, hash_files: bool) -> None:
    """Raise IntegrityError unless every entry exists below ``root`` with its size (and hash)."""
    for rel, (digest, size) in entries.items():
        path = root / rel
        try:
            if path.is_symlink():
                raise IntegrityError(f"{path} is a symbolic link")
            actual = path.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing") from None
        if actual != size:
            raise IntegrityError(f"{path} has size {actual}, expected {size}")
        if hash_files and file_sha256(path) != digest:
            raise IntegrityError(f"{path} does not match its sha256")


def _link_blob(store: LocalBlobStore, digest: str, size: int, rel: str, dst: Path) -> None:
    blob = store.path(digest)
    if not blob.is_file():
        raise NotFoundError(f"blob {digest[:12]}... ({rel}) is missing from {store.root}")
    if blob.stat().st_size != size or file_sha256(blob) != digest:
        raise IntegrityError(
            f"blob {digest[:12]}... ({rel}) in {store.root} is corrupted; run Registry.verify()"
        )
    try:
        os.link(blob, dst)
    except OSError:
        shutil.copyfile(blob, dst)


def materialise(
    store: LocalBlobStore, kind: str, key_digest: str, entries: Entries, *, verify_existing: bool
) -> Path:
    """Build (or check) ``cache/<kind>/<hex>/`` from blobs; every blob is hashed when it is built.

    kind: ``deltas`` or ``bases``. verify_existing: re-hash an existing cache directory's files
    (else sizes only). Returns the directory.
    """
    final = confine(store.root, f"cache/{kind}/{check_digest(key_digest)}")
    if final.is_dir():
        try:
            check_dir(final, entries, hash_files=verify_existing)
            return final
        except IntegrityError:
            # the cache or the blob under it is damaged: rebuild from blobs (which re-verifies them)
            shutil.rmtree(final, ignore_errors=True)
    tmp = temp_path(confine(store.root, "tmp"), f"cache-{kind}")
    try:
        for rel, (digest, size) in entries.items():
            dst = tmp / check_relpath(rel, allow_manifest=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            _link_blob(store, digest, size, rel, dst)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(tmp, final)
            fsync_dir(final.parent)
        except OSError:
            if not final.is_dir():  # another process built the same cache meanwhile: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
