"""Durable small-file writes, temp names and streaming hashes for the registry.

File hashing is the format layer's (:func:`deltakit.format.safetensors_io.file_sha256`), re-exported
here so every registry module hashes the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from deltakit.format.atomic import fsync_dir as fsync_dir  # re-exported for the registry modules
from deltakit.format.atomic import temp_path as format_temp_path
from deltakit.format.atomic import writer_pid as temp_owner  # noqa: F401  re-exported: pid in a temp name
from deltakit.format.safetensors_io import file_sha256 as file_sha256  # re-exported, see above

CHUNK = 4 << 20  # 4 MiB read/write chunk


def temp_path(directory: Path, stem: str) -> Path:
    """A unique hidden temp path ``directory/.<stem>.tmp-<pid>-<hex>`` (same folder: rename is atomic),
    named as the format layer names its temps; :func:`temp_owner` reads the writer's pid back."""
    return format_temp_path(directory / stem)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (no rename; see :func:`write_bytes_atomic`)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_bytes_atomic(final: Path, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically: temp file, fsync, rename, fsync the directory."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final.parent, final.name)
    try:
        write_synced(tmp, data)
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
