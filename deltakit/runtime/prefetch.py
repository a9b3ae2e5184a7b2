"""Reading the next deltas ahead of their swaps, while the current batch runs.

:class:`Prefetcher` reads a registered delta that is in neither cache from disk and prepares it (CPU
tensors; on CUDA also pinned and copied to the device on a side stream, ``non_blocking``) on a
background thread, without taking the runtime's lock, so a batch holding the lock keeps running. The
swap that next needs the delta takes the prepared copy instead of reading the disk; everything that
touches the model (pristine copies, validation, the write) still happens under the lock at that swap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from deltakit.format.delta import read_delta
from deltakit.format.manifest import Manifest
from deltakit.runtime.prepared import PreparedDelta, prepare_delta

log = logging.getLogger(__name__)


@dataclass
class Prefetched:
    """A delta read ahead: its host copy, and on CUDA its device copy with the event that marks it done."""

    host: PreparedDelta
    device: PreparedDelta | None = None
    ready: torch.cuda.Event | None = None
    read_bytes: int = 0
    #: what the job was started for (the runtime's registration): a copy read for another is not used
    owner: object = None

    def device_copy(self) -> PreparedDelta | None:
        """The device copy, once the current stream has waited for its transfer (None on the CPU)."""
        if self.device is not None and self.ready is not None:
            torch.cuda.current_stream().wait_event(self.ready)
        return self.device


class Prefetcher:
    """Background reads of deltas into a side table the runtime consumes at its next swap.

    resolve: checkpoint tensor name -> canonical parameter name (the resident model's).
    device: where swaps decode (a CUDA device gets pinned host copies and device copies).
    """

    def __init__(self, resolve: Callable[[str], str], device: torch.device):
        self.resolve = resolve
        self.device = device
        self._ready: dict[str, Prefetched] = {}
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self.started = 0  # prefetches begun
        self.used = 0  # prefetched deltas a swap took

    def start(
        self, jobs: Iterable[tuple[str, Path, bool, Manifest | None, object]]
    ) -> threading.Thread | None:
        """Read ``(name, delta directory, verify, expected manifest, owner)`` jobs on one daemon thread (as
        :func:`~deltakit.format.delta.read_delta` takes ``verify`` and ``expected``; ``owner`` is kept on
        the result); names already read or being read are skipped. Returns the thread (None when there is
        nothing to read)."""
        todo = []
        with self._lock:
            for name, *job in jobs:
                if name not in self._ready and name not in self._running:
                    self._running.add(name)
                    todo.append((name, *job))
        if not todo:
            return None
        self.started += len(todo)
        thread = threading.Thread(target=self._read_all, args=(todo,), name="deltakit-prefetch", daemon=True)
        thread.start()
        return thread

    def take(self, name: str, owner: object = None) -> Prefetched | None:
        """The prefetched copy of ``name`` (removed from the table), or None; a copy read for another
        ``owner`` (an earlier registration of the name) is dropped, not returned."""
        with self._lock:
            item = self._ready.pop(name, None)
        if item is not None and item.owner is not owner:
            item = None
        if item is not None:
            self.used += 1
        return item

    def discard(self, name: str) -> None:
        with self._lock:
            self._ready.pop(name, None)

    def _read_all(self, todo: list[tuple[str, Path, bool, Manifest | None, object]]) -> None:
        for name, *job in todo:
            try:
                item = self._read(name, *job)
            except Exception as exc:  # the swap reads it again and reports the error itself
                log.warning("prefetching delta %r failed: %s", name, exc)
                item = None
            with self._lock:
                self._running.discard(name)
                if item is not None:
                    self._ready[name] = item

    def _read(
        self, name: str, path: Path, verify: bool, expected: Manifest | None, owner: object
    ) -> Prefetched:
        delta = read_delta(path, verify=verify, expected=expected, name=name)
        host = prepare_delta(name, delta, self.resolve)
        read = host.stored_nbytes
        if self.device.type != "cuda":
            return Prefetched(host, read_bytes=read, owner=owner)
        host = host.to(self.device, pin=True)
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            on_device = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return Prefetched(host, on_device, ready, read, owner)
