"""Model identity: a fingerprint over every tensor's name, dtype, shape and bytes.

Each tensor gets its own digest, and the fingerprint hashes the sorted digests, so tensors can be
fed in any order while they stream past for other work (compress and apply read each tensor once).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from deltakit.format.digest_cache import SourceDigests
from deltakit.format.safetensors_io import dtype_name


def tensor_digest(name: str, tensor: torch.Tensor) -> str:
    """Hex sha256 of one tensor's name, dtype, shape and raw bytes (any device; not mutated)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([name, dtype_name(tensor.dtype), list(tensor.shape)]).encode())
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    digest.update(memoryview(data))
    return digest.hexdigest()


#: tensors queued for a background digest before :meth:`FingerprintBuilder.add_later` waits (bounds the
#: memory the queue keeps alive)
MAX_PENDING = 4
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltakit-digest")


class FingerprintBuilder:
    """Accumulates tensor digests (any order) into a model fingerprint ``sha256:<hex>``.

    :meth:`add_later` hashes on a background thread (sha256 releases the GIL), so a caller that decodes
    or writes tensors overlaps that work with hashing; :meth:`fingerprint` waits for every digest.
    """

    def __init__(self, remembered: SourceDigests | None = None) -> None:
        """remembered: digests kept from earlier runs over the same files; a tensor found there is not
        hashed, and :meth:`fingerprint` saves the ones it had to compute."""
        self._digests: dict[str, str] = {}
        self._pending: deque[tuple[str, Future[str]]] = deque()
        self._remembered = remembered

    def add(self, name: str, tensor: torch.Tensor) -> str:
        digest = tensor_digest(name, tensor)
        self._digests[name] = digest
        return digest

    def add_later(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor``'s digest on the background thread; the caller must not mutate ``tensor``
        before :meth:`fingerprint` returns. Waits for the oldest digest when MAX_PENDING are queued. A
        digest remembered for ``name`` is taken as is, without hashing."""
        digest = self._remembered.get(name) if self._remembered is not None else None
        if digest is not None:
            self._digests[name] = digest
            return
        self._pending.append((name, _HASHER.submit(tensor_digest, name, tensor)))
        while len(self._pending) > MAX_PENDING:
            self._collect_one()

    def _collect_one(self) -> None:
        name, future = self._pending.popleft()
        self._digests[name] = future.result()

    def add_digest(self, name: str, digest: str) -> None:
        self._digests[name] = digest

    def remembered(self, name: str) -> str | None:
        """The digest remembered from earlier runs for tensor ``name``, None when there is none."""
        return self._remembered.get(name) if self._remembered is not None else None

    def digest(self, name: str) -> str | None:
        """The digest of tensor ``name`` (waiting for queued ones as needed), None when it was not added."""
        while name not in self._digests and self._pending:
            self._collect_one()
        return self._digests.get(name)

    def __len__(self) -> int:
        while self._pending:
            self._collect_one()
        return len(self._digests)

    def fingerprint(self) -> str:
        while self._pending:
            self._collect_one()
        if self._remembered is not None:
            self._remembered.save(self._digests)
        combined = hashlib.sha256()
        for name in sorted(self._digests):
            combined.update(f"{name}\0{self._digests[name]}\n".encode())
        return "sha256:" + combined.hexdigest()


def fingerprint_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Fingerprint of an in-memory state dict."""
    builder = FingerprintBuilder()
    for name, tensor in tensors.items():
        builder.add(name, tensor)
    return builder.fingerprint()


def checkpoint_fingerprint(model_dir) -> str:
    """Fingerprint of a checkpoint directory (reads every tensor once, one at a time)."""
    from deltakit.models.checkpoint import open_checkpoint

    reader = open_checkpoint(model_dir)
    builder = FingerprintBuilder()
    for name in reader.names():
        builder.add(name, reader.get(name))
    return builder.fingerprint()
