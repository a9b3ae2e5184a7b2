"""Deltas on disk and in memory: writing shards, reading them back, checking their hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import torch

from deltakit.errors import FormatError, IntegrityError, TensorMismatchError
from deltakit.format.manifest import MANIFEST_NAME, FileEntry, Manifest, TensorEntry
from deltakit.format.paths import confined
from deltakit.format.safetensors_io import (
    StreamingSafetensorsWriter,
    TensorSpec,
    tensors_from_bytes,
)
from deltakit.format.shard_reader import ShardReader

SHARD_PATTERN = "delta-{:05d}.safetensors"


class ShardWriter:
    """Collects stored tensors and writes them to ``delta-NNNNN.safetensors`` shards.

    Memory stays at one shard (``max_shard_bytes``); tensors are written as given (not copied), through
    the same streaming safetensors writer as checkpoints, which hashes the file on the way.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 1 << 30):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._index = 1
        self.files: dict[str, FileEntry] = {}
        self.stored_bytes = 0

    @property
    def current_shard(self) -> str:
        return SHARD_PATTERN.format(self._index)

    def add(self, key: str, tensor: torch.Tensor) -> str:
        """Queue ``tensor`` under ``key``; returns the shard file it will be written to."""
        if key in self._buffer:
            raise FormatError(f"stored tensor key {key!r} written twice")
        shard = self.current_shard
        tensor = tensor.detach().to("cpu").contiguous()
        self._buffer[key] = tensor
        nbytes = tensor.numel() * tensor.element_size()
        self._buffer_bytes += nbytes
        self.stored_bytes += nbytes
        return shard

    @property
    def buffered(self) -> dict[str, torch.Tensor]:
        """The queued tensors by key (the live buffer: replacing a value changes what :meth:`flush` writes)."""
        return self._buffer

    def maybe_flush(self) -> None:
        """Write the current shard once it has reached the size limit (call between groups)."""
        if self._buffer_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.out_dir / self.current_shard
        specs = [TensorSpec(key, t.dtype, tuple(t.shape)) for key, t in self._buffer.items()]
        with StreamingSafetensorsWriter(path, specs, metadata={"format": "deltakit"}) as writer:
            for key, tensor in self._buffer.items():
                writer.write(key, tensor)
        self.files[path.name] = FileEntry(writer.sha256, writer.size)
        self._buffer = {}
        self._buffer_bytes = 0
        self._index += 1


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    (Path(out_dir) / MANIFEST_NAME).write_text(manifest.to_json())


def verify_files(delta_dir: Path, manifest: Manifest) -> None:
    """Check every file the manifest lists: a plain file inside the directory, right size, right sha256.

    Every shard a tensor entry names must be one of the listed files.
    """
    check_sha256s(delta_dir, check_listed_files(delta_dir, manifest))


#: one listed file for :func:`check_sha256s`: its manifest name, path, size and sha256
ListedFile = tuple[str, Path, int, str]


def check_listed_files(delta_dir: Path, manifest: Manifest) -> list[ListedFile]:
    """:func:`verify_files` without the sha256s: every listed file a plain file inside the directory, of
    the listed size, every shard a tensor names listed. Returns what :func:`check_sha256s` needs."""
    delta_dir = Path(delta_dir)
    for name, entry in manifest.tensors.items():
        if entry.shard is not None and entry.shard not in manifest.files:
            raise IntegrityError(f"{delta_dir}: tensor {name}: shard {entry.shard!r} is not a listed file")
    checks = []
    for rel, entry in manifest.files.items():
        path = confined(delta_dir, rel)
        if not path.is_file():
            raise IntegrityError(f"{delta_dir}: file {rel} listed in the manifest is missing")
        size = path.stat().st_size
        if size != entry.size:
            raise IntegrityError(
                f"{delta_dir}: {rel} is {size} bytes, manifest says {entry.size} (truncated?)"
            )
        checks.append((rel, path, entry.size, entry.sha256))
    return checks


def check_sha256s(
    delta_dir: Path, checks: list[ListedFile], stop: threading.Event | None = None, chunk: int = 1 << 22
) -> None:
    """IntegrityError for the first listed file whose sha256 differs, that is no longer a plain file of
    its listed size, or that cannot be read. Each file is opened without following a symbolic link and
    read to at most its listed size plus one byte, 4 MiB at a time; with ``stop`` set between two
    reads, returns at once (nothing checked further)."""
    for rel, path, size, sha256 in checks:
        with _open_plain(delta_dir, rel, path) as fh:
            digest, read = hashlib.sha256(), 0
            while read <= size:
                if stop is not None and stop.is_set():
                    return
                block = fh.read(min(chunk, size + 1 - read))
                if not block:
                    break
                digest.update(block)
                read += len(block)
        if read != size:
            raise IntegrityError(f"{delta_dir}: {rel} changed size while it was read")
        if digest.hexdigest() != sha256:
            raise IntegrityError(f"{delta_dir}: {rel} does not match its sha256 (corrupted)")


def read_delta(
    path: Path | str, *, verify: bool = True, expected: Manifest | None = None, name: str | None = None
) -> Delta:
    """A delta read whole into memory, for a process that keeps it (the runtime's caches).

    Every listed file is read once (a plain file inside the directory, of its listed size) and, with
    ``verify``, its sha256 checked on the bytes read; the shards' tensors are built from those same bytes.
    So what is served is what was checked, and a later change to the files, even in place, never reaches
    the tensors (a memory-mapped shard rewritten in place would change them, or end the process when cut
    short). expected: the manifest an earlier read of this directory gave (a delta read again after it
    left a cache): IntegrityError when the manifest on disk now differs, so what was checked then still
    holds (its ``created`` time aside: a delta compressed again from the same inputs has the same bytes);
    ``name``: the delta's name in the runtime, for that error. IntegrityError / FormatError otherwise."""
    path = Path(path)
    manifest = Manifest.read(path)
    if expected is not None and not _same_delta(manifest, expected):
        raise IntegrityError(
            f"delta {name or str(path)!r} changed on disk since it was loaded; remove it and add it again "
            "to serve the new version"
        )
    shards = {entry.shard for entry in manifest.tensors.values() if entry.shard is not None}
    if verify:
        files = check_listed_files(path, manifest)
    else:  # the shards as they are, any size
        files = [(rel, confined(path, rel), None, None) for rel in sorted(shards)]
    stored: dict[str, torch.Tensor] = {}
    shard_of: dict[str, str] = {}
    for rel, file, size, sha256 in files:
        data = _read_listed(path, rel, file, size, sha256)
        if rel in shards:
            for key, tensor in tensors_from_bytes(data, path / rel).items():
                stored[key] = tensor
                shard_of[key] = rel if key not in shard_of else ""  # "": held by two shards
    for name, entry in manifest.tensors.items():  # each key in its entry's own shard, as on disk
        for key in (*entry.stored.values(), entry.value, entry.extra_rows):
            if key is not None and shard_of.get(key) != entry.shard:
                raise FormatError(
                    f"{path}: tensor {name}: shard {entry.shard!r} holds no single tensor {key!r}"
                )
    return Delta(manifest, path, stored)


def _same_delta(manifest: Manifest, other: Manifest) -> bool:
    """Whether two manifests describe the same delta: equal but for their ``created`` time (a delta
    compressed again from the same inputs has the same files)."""
    return dataclasses.replace(manifest, created=other.created) == other


def _open_plain(delta_dir: Path, rel: str, path: Path) -> BinaryIO:
    """Listed file ``rel`` opened unbuffered for reading, not through a symbolic link; IntegrityError
    when it cannot be opened or is no longer a plain file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise IntegrityError(f"{delta_dir}: {rel} cannot be read ({exc.strerror})") from None
    fh = os.fdopen(fd, "rb", buffering=0)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        fh.close()
        raise IntegrityError(f"{delta_dir}: {rel} is no longer a plain file")
    return fh


def _read_listed(delta_dir: Path, rel: str, path: Path, size: int | None, sha256: str | None) -> bytearray:
    """The bytes of file ``rel`` (not through a symbolic link, at most its listed size read), IntegrityError
    unless they are exactly ``size`` bytes (None: the file's size when opened) with the given ``sha256``
    (None: not checked)."""
    with _open_plain(delta_dir, rel, path) as fh:
        size = os.fstat(fh.fileno()).st_size if size is None else size
        data = bytearray(size + 1)
        read = 0
        with memoryview(data) as view:
            while read <= size:
                got = fh.readinto(view[read:])
                if not got:
                    break
                read += got
    if read != size:
        raise IntegrityError(f"{delta_dir}: {rel} changed size while it was read")
    del data[size:]
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"{delta_dir}: {rel} does not match its sha256 (corrupted)")
    return data


class BackgroundCheck:
    """:func:`verify_files` with the sha256s checked on a background thread (sha256 releases the GIL):
    the listing and sizes are checked when it is made, the digests while the caller goes on. A caller
    must take :meth:`result` before it publishes anything made from the files, and :meth:`cancel` it
    when it gives up (the thread then ends at its next 4 MiB read)."""

    def __init__(self, delta_dir: Path, manifest: Manifest):
        checks = check_listed_files(delta_dir, manifest)
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltakit-verify")
        try:
            self._future = pool.submit(check_sha256s, Path(delta_dir), checks, self._stop)
        finally:
            pool.shutdown(wait=False)  # the thread ends once the check is done

    def result(self) -> None:
        """Wait for the check; raises its IntegrityError."""
        self._future.result()

    def failure(self) -> BaseException | None:
        """Wait for the check; its error, or None when the files match."""
        return self._future.exception()

    def cancel(self) -> None:
        self._stop.set()


class Delta:
    """A delta's manifest plus lazy access to its stored tensors (storage only: no codec involved).

    Built by :func:`load_delta` from a directory, or by :func:`deltakit.compress` in memory (then
    ``stored`` holds the tensors). Decoding lives in :mod:`deltakit.core.decode`.
    """

    def __init__(
        self, manifest: Manifest, path: Path | None = None, stored: dict[str, torch.Tensor] | None = None
    ):
        self.manifest = manifest
        self.path = Path(path) if path is not None else None
        self._stored = stored
        self._readers: dict[str, ShardReader] = {}
        self._open_lock = threading.Lock()  # apply's workers read tensors side by side: one reader a shard

    @property
    def in_memory(self) -> bool:
        """Whether the stored tensors are held in memory (built by :func:`deltakit.compress`)."""
        return self._stored is not None

    def replace_stored(self, key: str, tensor: torch.Tensor) -> None:
        """Replace in-memory stored tensor ``key`` by ``tensor`` of the same dtype and shape (so the
        delta's size is unchanged); FormatError for an unknown key, another dtype/shape or a delta on disk."""
        if self._stored is None:
            raise FormatError(f"stored tensor {key!r} lives on disk and cannot be replaced in place")
        old = self._stored.get(key)
        if old is None:
            raise FormatError(f"stored tensor {key!r} is missing")
        if old.dtype != tensor.dtype or old.shape != tensor.shape:
            raise FormatError(
                f"stored tensor {key!r}: a {tensor.dtype} {list(tensor.shape)} tensor cannot replace "
                f"its {old.dtype} {list(old.shape)} one"
            )
        self._stored[key] = tensor.detach().to("cpu").contiguous()

    def stored_tensor(self, key: str, shard: str | None) -> torch.Tensor:
        """The stored tensor ``key`` (CPU, as written), read lazily from ``shard``."""
        if self._stored is not None:
            if key not in self._stored:
                raise FormatError(f"stored tensor {key!r} is missing")
            return self._stored[key]
        self.stored_spec(key, shard)
        try:
            return self._readers[shard].get_tensor(key)
        except OSError as exc:
            raise FormatError(f"{self.path / shard}: cannot read {key!r} ({exc.strerror})") from None
        except (RuntimeError, TypeError, ValueError) as exc:  # torch refusing a shape the header allows
            raise FormatError(f"{self.path / shard}: cannot read {key!r} ({str(exc)[:120]})") from None

    def stored_spec(self, key: str, shard: str | None) -> TensorSpec:
        """Name, dtype and shape of stored tensor ``key`` without reading its data (shard header only)."""
        if self._stored is not None:
            tensor = self.stored_tensor(key, shard)
            return TensorSpec(key, tensor.dtype, tuple(tensor.shape))
        if self.path is None or shard is None:
            raise FormatError(f"stored tensor {key!r} has no shard")
        if shard not in self._readers:
            with self._open_lock:
                if shard not in self._readers:
                    self._open(shard)
        spec = self._readers[shard].specs.get(key)
        if spec is None:
            raise FormatError(f"{self.path / shard}: holds no tensor {key!r}")
        return spec

    def _open(self, shard: str) -> None:
        if self.manifest.files and shard not in self.manifest.files:
            raise FormatError(f"{self.path}: shard {shard!r} is not among the manifest's files")
        path = confined(self.path, shard)
        try:
            reader = ShardReader(_open_plain(self.path, shard, path), self.path / shard)
        except OSError as exc:
            raise FormatError(f"{self.path / shard}: cannot read ({exc.strerror})") from None
        self._readers[shard] = reader

    def entry(self, name: str) -> TensorEntry:
        """The manifest entry of tensor ``name``; a name the delta lacks is a TensorMismatchError."""
        entry = self.manifest.tensors.get(name)
        if entry is None:
            raise TensorMismatchError(f"the delta has no tensor {name!r}")
        return entry

    def codec_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The codec's stored tensors of encoded tensor ``name`` (local name -> tensor)."""
        entry = self.entry(name)
        return {local: self.stored_tensor(key, entry.shard) for local, key in entry.stored.items()}

    def exact(self, name: str, which: str = "value") -> torch.Tensor:
        """A tensor stored bit for bit: a passthrough ``value`` or an encoded tensor's ``extra_rows``."""
        entry = self.entry(name)
        key = getattr(entry, which)
        if key is None:
            raise FormatError(f"tensor {name}: no {which} stored")
        return self.stored_tensor(key, entry.shard)

    def tensor_names(self) -> list[str]:
        return list(self.manifest.tensors)


def load_delta(path: Path | str, *, verify: bool = True) -> Delta:
    """Open a delta directory; with ``verify`` (default) every file's size and sha256 are checked first.
    The shards' tensors are read when asked for (positioned reads, not memory-mapped: a shard cut short
    meanwhile is an IntegrityError): for one pass (apply, eval); a process that keeps the delta uses
    :func:`read_delta`."""
    path = Path(path)
    manifest = Manifest.read(path)
    if verify:
        verify_files(path, manifest)
    return Delta(manifest, path)


def fp16_delta_bytes(shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape)
