"""A :class:`~deltakit.registry.blobstore.BlobStore` on an S3-compatible object store (via fsspec/s3fs).

URL form: ``s3://bucket/prefix``. The endpoint comes from ``endpoint_url`` or the ``DELTAKIT_S3_ENDPOINT``
/ ``AWS_ENDPOINT_URL`` environment variables (unset: AWS itself); credentials come from the usual AWS
sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles...). An object PUT becomes visible only
when complete, so a blob or ref is never seen half-written; blobs are uploaded before the refs naming them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deltakit.errors import IntegrityError, NotFoundError, RegistryError, UsageError
from deltakit.registry.blobstore import _HEX, blob_key, check_digest
from deltakit.registry.fsutil import file_sha256


def _s3fs(endpoint_url: str | None, storage_options: dict[str, Any] | None) -> Any:
    try:
        import s3fs
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RegistryError("remote registries need the 's3fs' package: pip install s3fs") from exc
    options: dict[str, Any] = dict(storage_options or {})
    endpoint = endpoint_url or os.environ.get("DELTAKIT_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = dict(options.pop("client_kwargs", {}) or {})
    if endpoint:
        client_kwargs.setdefault("endpoint_url", endpoint)
    client_kwargs.setdefault("region_name", os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, **options)


class S3BlobStore:
    """Blobs and ref documents under ``s3://bucket/prefix`` (same layout as the local store)."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        storage_options: dict[str, Any] | None = None,
        create_bucket: bool = True,
    ) -> None:
        if not url.startswith("s3://"):
            raise UsageError(f"remote registry URL must look like s3://bucket/prefix, got {url!r}")
        path = url[len("s3://") :].strip("/")
        if not path:
            raise UsageError(f"remote registry URL {url!r} names no bucket")
        self.url = f"s3://{path}"
        self.bucket = path.split("/")[0]
        self.prefix = path
        self.fs = _s3fs(endpoint_url, storage_options)
        if create_bucket:
            self._ensure_bucket()

    def _ensure_bucket(self) -> None:
        try:
            if not self.fs.exists(self.bucket):
                self.fs.mkdir(self.bucket)
        except FileExistsError:
            pass
        except PermissionError as exc:
            raise RegistryError(f"cannot reach or create bucket {self.bucket!r}: {exc}") from exc

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise IntegrityError(f"unsafe object key {key!r}")
        return f"{self.prefix}/{key}"

    # -- blobs ---------------------------------------------------------------------------------
    def has(self, digest: str) -> bool:
        return self.size(digest) is not None

    def size(self, digest: str) -> int | None:
        try:
            return int(self.fs.info(self._key(blob_key(digest)))["size"])
        except FileNotFoundError:
            return None

    def iter_digests(self) -> Iterator[str]:
        root = self._key("blobs/sha256")
        self.fs.invalidate_cache(root)
        try:
            paths = self.fs.find(root)
        except FileNotFoundError:
            return
        for path in paths:
            name = path.rsplit("/", 1)[-1]
            if _HEX.fullmatch(name):
                yield name

    def put_file(self, src: Path, digest: str) -> bool:
        digest = check_digest(digest)
        got = file_sha256(src)
        if got != digest:
            raise IntegrityError(
                f"refusing to upload {src}: it hashes to {got[:12]}..., not {digest[:12]}..."
            )
        self.fs.put_file(str(src), self._key(blob_key(digest)))
        return True

    def put_bytes(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        self.fs.pipe_file(self._key(blob_key(digest)), data)
        return digest

    def get_file(self, digest: str, dst: Path) -> int:
        digest = check_digest(digest)
        try:
            self.fs.get_file(self._key(blob_key(digest)), str(dst))
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]}... is missing from {self.url}") from None
        got, size = file_sha256(dst), dst.stat().st_size
        if got != digest:
            dst.unlink()
            raise IntegrityError(
                f"blob {digest[:12]}... from {self.url} is corrupted (hashes to {got[:12]}...)"
            )
        return size

    def get_bytes(self, digest: str) -> bytes:
        digest = check_digest(digest)
        try:
            data = self.fs.cat_file(self._key(blob_key(digest)))
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]}... is missing from {self.url}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(f"blob {digest[:12]}... from {self.url} is corrupted")
        return data

    def delete(self, digest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(blob_key(digest)))

    # -- documents -----------------------------------------------------------------------------
    def read_doc(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._key(key))
        except FileNotFoundError:
            return None

    def write_doc(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(key), data)

    def delete_doc(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._key(key))

    def list_docs(self, prefix: str) -> list[str]:
        root = self._key(prefix.rstrip("/"))
        self.fs.invalidate_cache(root)
        try:
            paths = self.fs.find(root)
        except FileNotFoundError:
            return []
        start = len(self.prefix) + 1
        return sorted(p[start:] for p in paths if p.endswith(".json"))
