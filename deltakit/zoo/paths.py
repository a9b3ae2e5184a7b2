"""Where the fleet lives on disk, and atomic directory writes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

ENV_CACHE = "DELTAKIT_CACHE"


def cache_dir() -> Path:
    """The deltakit cache root: ``$DELTAKIT_CACHE`` if set, else ``platformdirs.user_cache_dir("deltakit")``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("deltakit"))


def zoo_dir() -> Path:
    """Root of the real fleet: ``<cache>/zoo`` (``base/``, ``variants/<name>/``, ``texts/``, ``downloads/``)."""
    return cache_dir() / "zoo"


def _publish_modes(root: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the finished tree the usual 755/644 modes."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside ``final``; on success rename it to ``final`` (replacing an old one).

    On an exception the temp dir is removed and ``final`` is left untouched, so readers never see a
    half-written checkpoint.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _publish_modes(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
