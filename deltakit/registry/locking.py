"""Inter-process locks on the registry directory (POSIX ``flock``; a no-op where unavailable).

Writers (push, add-base, rm, set-eval, pull-remote) hold the lock shared, so they run side by side;
``gc`` and ``rebuild_catalog`` hold it exclusive, so they never delete or re-index under a writer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def registry_lock(path: Path, exclusive: bool) -> Iterator[None]:
    """Hold the lock file ``path`` shared or exclusive for the duration of the block."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock
