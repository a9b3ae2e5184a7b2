"""Atomic directory output: write into a hidden temp directory, fsync, then rename into place.

An interrupted run (crash, Ctrl-C, SIGKILL) leaves no half-written output under the final name; at
worst a hidden ``.NAME.tmp-*`` directory stays behind, which the next run for the same output removes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from deltakit.errors import UsageError


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk (no-op where the OS does not allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every regular file below ``path`` and every directory, deepest first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(Path(root))


def temp_path(final: Path, tag: str = "tmp") -> Path:
    """A unique hidden path next to ``final`` (same directory, so a rename is atomic):
    ``.NAME.TAG-PID-RANDOM``; the PID lets a later run tell a live writer's temp from a stale one."""
    return final.parent / f".{final.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_temps(final: Path) -> None:
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        with contextlib.suppress(OSError):
            pid = int(stale.name.rsplit("-", 2)[-2])
            if pid_alive(pid):
                continue
        shutil.rmtree(stale, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(final: Path | str, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory that becomes ``final`` when the block exits without error.

    final: the output directory; must not exist unless ``overwrite`` (then it is replaced whole).
    On error the temp directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise UsageError(f"output {final} already exists; remove it or pass overwrite=True")
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    tmp = temp_path(final)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            trash = temp_path(final, "old")
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
