"""Inter-process locks on the registry directory (POSIX ``flock``; a no-op where unavailable).

Two lock files:

- ``lock``: writers (push, add-base, rm, set-eval, pull, pull-remote) hold it shared, so they run side by
  side; ``gc`` and ``rebuild_catalog`` hold it exclusive, so they never delete or re-index under a writer.
- ``gate``: a turnstile that keeps the exclusive holder from being starved. A writer passes the gate
  (takes it shared) only while it acquires ``lock``; an exclusive holder takes the gate exclusive first,
  so writers that arrive after it queue at the gate while the writers already inside drain. The exclusive
  wait is bounded: after ``timeout`` seconds the gate is released and RegistryError raised.

Both are re-entrant within one :class:`RegistryLock` object (nested calls of the same process do not
take the file lock again, so they cannot deadlock against a waiting gc).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from deltakit.errors import RegistryError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_POLL_S = 0.02


def _open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def registry_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold the lock file ``path`` shared or exclusive for the duration of the block (blocking)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _flock_within(fd: int, deadline: float) -> bool:
    """Take ``fd`` exclusive, polling until ``time.monotonic()`` reaches ``deadline``; return whether taken."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


class RegistryLock:
    """The registry's shared/exclusive lock with a writer turnstile (see the module docstring).

    root: the registry directory holding ``lock`` and ``gate``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._depth = 0  # nesting depth of held locks in this object
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the lock shared: many writers at once, none while gc or a rebuild runs."""
        if self._depth or fcntl is None:
            with self._nested():
                yield
            return
        fd = _open_lock_file(self.root / "lock")
        try:
            with registry_lock(self.root / "gate", exclusive=False):
                fcntl.flock(fd, fcntl.LOCK_SH)
            with self._nested():
                yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def exclusive(self, timeout: float, what: str) -> Iterator[None]:
        """Hold the lock alone; wait at most ``timeout`` seconds for writers to drain (RegistryError)."""
        if self._depth or fcntl is None:
            if self._depth and not self._exclusive:
                raise RegistryError(f"{what} cannot run while this registry object holds a shared lock")
            with self._nested(exclusive=True):
                yield
            return
        gate = _open_lock_file(self.root / "gate")
        fd = _open_lock_file(self.root / "lock")
        try:
            deadline = time.monotonic() + timeout
            if not (_flock_within(gate, deadline) and _flock_within(fd, deadline)):
                raise RegistryError(
                    f"registry {self.root} is busy: writers held it for {timeout:g} s; {what} did not run "
                    "(retry, or pass a larger timeout=)"
                )
            with self._nested(exclusive=True):
                yield
        finally:
            os.close(fd)
            os.close(gate)

    @contextlib.contextmanager
    def _nested(self, exclusive: bool = False) -> Iterator[None]:
        outer = self._exclusive
        self._depth += 1
        self._exclusive = outer or exclusive
        try:
            yield
        finally:
            self._depth -= 1
            self._exclusive = outer
