"""Durable small-file writes and streaming hashes for the registry (temp file + fsync + rename)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from deltakit.format.atomic import fsync_dir as fsync_dir  # re-exported for the registry modules

CHUNK = 4 << 20  # 4 MiB read/write chunk


def temp_name(final: Path) -> Path:
    """A unique hidden temp path next to ``final`` (same directory, so rename is atomic)."""
    return final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically: temp file, fsync, rename, fsync the directory."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(final.parent)


def iter_chunks(fh: BinaryIO, chunk: int = CHUNK) -> Iterator[bytes]:
    """Yield successive chunks of an open binary file until EOF."""
    while True:
        block = fh.read(chunk)
        if not block:
            return
        yield block


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex sha256 and size in bytes of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for block in iter_chunks(fh):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def copy_hashed(src: BinaryIO, dst_path: Path) -> tuple[str, int]:
    """Copy a stream into a new file ``dst_path`` (fsynced) and return its hex sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with open(dst_path, "wb") as out:
        for block in iter_chunks(src):
            digest.update(block)
            out.write(block)
            size += len(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), size
