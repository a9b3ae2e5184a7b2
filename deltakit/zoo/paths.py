"""Where the fleet lives on disk, and atomic directory writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deltakit.cachedir import cache_dir
from deltakit.format.atomic import atomic_directory


def zoo_dir() -> Path:
    """Root of the real fleet: ``<cache>/zoo`` (``base/``, ``variants/<name>/``, ``texts/``, ``downloads/``)."""
    return cache_dir() / "zoo"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``final``; on success it replaces ``final`` whole.

    The fleet's cache entries are rebuilt in place, so an existing ``final`` is replaced; on an
    exception ``final`` is left untouched (see :func:`deltakit.format.atomic.atomic_directory`).
    """
    with atomic_directory(final, overwrite=True) as tmp:
        yield tmp


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
