"""Content-addressed storage behind one interface: blobs by sha256 plus small JSON documents (refs).

Layout (same on a local directory and under an object-store prefix)::

    blobs/sha256/ab/abcdef...      immutable content, named by the sha256 of its bytes
    refs/...                       small JSON documents that name blobs (written last, replaced whole)

Blob writes are idempotent: writing a blob that is there already does nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from deltakit.errors import FormatError, IntegrityError, NotFoundError
from deltakit.registry.fsutil import (
    copy_hashed,
    file_sha256,
    fsync_dir,
    temp_path,
    write_bytes_atomic,
    write_synced,
)
from deltakit.registry.layout import confine

_HEX = re.compile(r"[0-9a-f]{64}")


def check_digest(digest: object) -> str:
    """Return a bare lowercase hex sha256 (accepts a ``sha256:`` prefix); raise IntegrityError otherwise."""
    if not isinstance(digest, str):
        raise IntegrityError(f"not a sha256 hex digest: {type(digest).__name__}")
    bare = digest[len("sha256:") :] if digest.startswith("sha256:") else digest
    if not _HEX.fullmatch(bare):
        raise IntegrityError(f"not a sha256 hex digest: {digest[:80]!r}")
    return bare


def blob_key(digest: str) -> str:
    """Relative key of a blob: ``blobs/sha256/ab/<hex>``."""
    digest = check_digest(digest)
    return f"blobs/sha256/{digest[:2]}/{digest}"


@runtime_checkable
class BlobStore(Protocol):
    """Where blobs and ref documents live: a local directory or an object-store prefix."""

    url: str

    def has(self, digest: str) -> bool:
        """Whether the blob is present (existence only, no hashing)."""
        ...

    def size(self, digest: str) -> int | None:
        """Stored size of the blob in bytes, or None if absent."""
        ...

    def iter_digests(self) -> Iterator[str]:
        """Every blob digest present (hex), in no particular order."""
        ...

    def put_file(self, src: Path, digest: str) -> bool:
        """Store ``src`` as blob ``digest`` after checking its hash; return False if already present."""
        ...

    def put_bytes(self, data: bytes) -> str:
        """Store bytes as a blob and return its hex digest."""
        ...

    def get_file(self, digest: str, dst: Path) -> int:
        """Write blob ``digest`` to the new file ``dst``, verifying its hash; return its size."""
        ...

    def get_bytes(self, digest: str) -> bytes:
        """Read a (small) blob whole, verifying its hash."""
        ...

    def delete(self, digest: str) -> None:
        """Remove a blob if present."""
        ...

    def read_doc(self, key: str) -> bytes | None:
        """Bytes of a small document (``refs/...``), or None if absent."""
        ...

    def write_doc(self, key: str, data: bytes) -> None:
        """Create or replace a small document atomically."""
        ...

    def delete_doc(self, key: str) -> None:
        """Remove a document if present."""
        ...

    def list_docs(self, prefix: str) -> list[str]:
        """Keys of every document below ``prefix`` (e.g. ``refs/deltas/``), sorted."""
        ...


def _not_a_document(path: Path) -> bytes:
    raise FormatError(f"{path} is not a regular file")


def _verify(digest: str, got: str, where: str) -> None:
    if got != digest:
        raise IntegrityError(
            f"blob {digest[:12]}... at {where} is corrupted: its content hashes to {got[:12]}..."
        )


class LocalBlobStore:
    """A :class:`BlobStore` on a local directory; writes go through ``tmp/`` + fsync + rename."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        self.tmp_dir = self.root / "tmp"

    # -- blobs ---------------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        """Local path of blob ``digest`` (whether or not it exists); never outside the registry root."""
        return confine(self.root, blob_key(digest))

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def iter_digests(self) -> Iterator[str]:
        base = confine(self.root, "blobs/sha256")
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if sub.is_symlink() or not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.is_file(follow_symlinks=False) and _HEX.fullmatch(entry.name):
                    yield entry.name

    def _tmp(self) -> Path:
        confine(self.root, "tmp").mkdir(parents=True, exist_ok=True)
        return temp_path(self.tmp_dir, "blob")

    def _install(self, tmp: Path, digest: str) -> None:
        final = self.path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)  # same content under the same name: a race between writers is harmless
        fsync_dir(final.parent)

    def put_file(self, src: Path, digest: str) -> bool:
        digest = check_digest(digest)
        if self.has(digest):
            return False
        tmp = self._tmp()
        try:
            with open(src, "rb") as fh:
                got, _ = copy_hashed(fh, tmp)
            _verify(digest, got, str(src))
            self._install(tmp, digest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return True

    def put_bytes(self, data: bytes) -> str:
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        if self.has(digest):
            return digest
        tmp = self._tmp()
        try:
            write_synced(tmp, data)
            self._install(tmp, digest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return digest

    def new_tmp(self) -> Path:
        """A fresh path in this store's temp directory (same filesystem as the blobs)."""
        return self._tmp()

    def adopt(self, tmp: Path, digest: str) -> None:
        """Move a file written to :meth:`new_tmp` in as blob ``digest`` after checking its hash."""
        digest = check_digest(digest)
        _verify(digest, file_sha256(tmp), str(tmp))
        self._install(tmp, digest)

    def get_file(self, digest: str, dst: Path) -> int:
        digest = check_digest(digest)
        src = self.path(digest)
        try:
            fh = open(src, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]}... is missing from {self.url}") from None
        with fh:
            try:
                got, size = copy_hashed(fh, dst)
                _verify(digest, got, str(src))
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    dst.unlink()
                raise
        return size

    def get_bytes(self, digest: str) -> bytes:
        import hashlib

        digest = check_digest(digest)
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]}... is missing from {self.url}") from None
        _verify(digest, hashlib.sha256(data).hexdigest(), str(self.path(digest)))
        return data

    def verify_blob(self, digest: str) -> str | None:
        """Re-hash a stored blob; return a problem description or None if it is intact."""
        try:
            got = file_sha256(self.path(digest))
        except FileNotFoundError:
            return "missing"
        return None if got == digest else f"content hashes to {got[:12]}..."

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(digest).unlink()

    def clean_tmp(self, older_than_s: float = 0.0) -> int:
        """Remove leftover temp files (from interrupted writes); return how many were removed."""
        removed = 0
        if not self.tmp_dir.is_dir():
            return 0
        now = time.time()
        for entry in os.scandir(self.tmp_dir):
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= older_than_s:
                    if entry.is_dir(follow_symlinks=False):  # a symlink is unlinked, never followed
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    removed += 1
        return removed

    # -- documents -----------------------------------------------------------------------------
    def _doc_path(self, key: str) -> Path:
        return confine(self.root, key)

    def read_doc(self, key: str) -> bytes | None:
        path = self._doc_path(key)
        try:
            if path.is_symlink() or not path.is_file():
                return None if not path.exists() else _not_a_document(path)
            return path.read_bytes()
        except FileNotFoundError:
            return None

    def write_doc(self, key: str, data: bytes) -> None:
        write_bytes_atomic(self._doc_path(key), data)

    def delete_doc(self, key: str) -> None:
        path = self._doc_path(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            fsync_dir(path.parent)
        # prune empty parent directories up to the top-level folder of the key
        top = self.root / key.split("/")[0]
        parent = path.parent
        while parent != top and parent.is_relative_to(top):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def list_docs(self, prefix: str) -> list[str]:
        base = self._doc_path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") or not name.endswith(".json"):
                    continue  # temp files of interrupted writes
                keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)
