"""Atomic directory output: write into a hidden temp directory, fsync, then rename into place.

An interrupted run (crash, Ctrl-C, SIGKILL) leaves no half-written output under the final name; at
worst a hidden ``.NAME.tmp-*`` directory (or the ``.NAME.old-*`` of an interrupted replace) stays behind,
which the next run for the same output removes once its writer's process is gone (an old output whose
replacement never arrived is put back). Two writers of one output cannot both succeed: each holds the
exclusive lock file ``.NAME.lock`` while it writes, and the second is refused with a UsageError.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from deltakit.errors import UsageError
from deltakit.format.paths import overlaps

_SYNC_FILE_RANGE_WRITE = 2  # Linux: start writing the range's dirty pages, do not wait


@functools.cache
def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None where the C library lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of file ``fd`` from ``offset`` to disk, without
    waiting (Linux ``sync_file_range``; nothing elsewhere or on error). The final fsync then finds those
    pages written or in flight instead of flushing the whole file at once; durability still comes from
    that fsync alone."""
    function = _sync_file_range()
    if function is not None and length > 0:
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


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


def writer_pid(name: str) -> int | None:
    """The process id in a name made by :func:`temp_path` (``.NAME.TAG-PID-RANDOM``), else None."""
    head, _, tail = name.rpartition("-")
    _, sep, pid = head.rpartition("-")
    if not name.startswith(".") or not sep or not pid.isdigit() or not tail:
        return None
    return int(pid)


def _remove_stale_temps(final: Path) -> None:
    """Remove temp and old directories of writers that are gone; restore an old output left alone."""
    for tag in ("tmp", "old"):
        for stale in final.parent.glob(f".{glob.escape(final.name)}.{tag}-*"):
            pid = writer_pid(stale.name)
            if pid is None or pid_alive(pid) or stale.is_symlink():
                continue
            if tag == "old" and not final.exists():
                with contextlib.suppress(OSError):
                    os.rename(stale, final)
                    continue
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def writer_lock(final: Path) -> Iterator[None]:
    """Hold ``.NAME.lock`` next to ``final`` (created exclusively, holding our pid) for the block.

    A lock whose writer is gone is taken over; a live one is a UsageError.
    """
    lock = final.parent / f".{final.name}.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid) or not pid and _young(lock):
                raise UsageError(
                    f"output {final} is being written by another process (pid {pid or '?'}); "
                    f"wait for it, or remove {lock.name} if no writer is running"
                ) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        break
    else:
        raise UsageError(f"output {final}: cannot take the writer lock {lock.name}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


def _young(path: Path, seconds: float = 10.0) -> bool:
    """Whether ``path`` was modified in the last few seconds (a lock whose pid is not written yet)."""
    import time

    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


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
def atomic_directory(
    final: Path | str,
    *,
    overwrite: bool = False,
    inputs: tuple[Path | str | None, ...] = (),
    sync: bool = True,
) -> Iterator[Path]:
    """Yield a temp directory that becomes ``final`` when the block exits without error.

    final: the output directory; must not exist unless ``overwrite`` (then it is replaced whole).
    inputs: directories the writer reads; ``final`` may not be, contain or lie inside any of them.
    sync: fsync every file and directory before the rename and the parent after it, so the output
    survives an OS crash or power loss once this returns. Without it the rename still makes the output
    appear whole or not at all to other processes, but the kernel writes it to disk later.
    On error the temp directory is removed and ``final`` is left as it was.
    """
    final = Path(final)
    for source in inputs:
        if source is not None and overlaps(final, source):
            raise UsageError(f"output {final} is, contains or lies inside the input {source}; choose another")
    if final.exists() and not overwrite:
        raise UsageError(f"output {final} already exists; remove it or pass overwrite=True")
    final.parent.mkdir(parents=True, exist_ok=True)
    with writer_lock(final):
        _remove_stale_temps(final)
        if (final.exists() or final.is_symlink()) and not overwrite:
            raise UsageError(f"output {final} already exists; remove it or pass overwrite=True")
        if final.is_symlink() or final.exists() and not final.is_dir():
            raise UsageError(f"output {final} is not a directory; refusing to replace it")
        tmp = temp_path(final)
        tmp.mkdir()
        try:
            yield tmp
            if sync:
                fsync_tree(tmp)
            if final.exists():
                trash = temp_path(final, "old")
                os.rename(final, trash)
                os.rename(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, final)
            if sync:
                fsync_dir(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
