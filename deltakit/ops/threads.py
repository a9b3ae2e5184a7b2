"""torch's CPU threads: how many this process may use, and pinning the count for a block.

:func:`available_cpus` counts the CPUs of the affinity mask, capped by the cgroup quota (v2 ``cpu.max``,
v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``). :func:`default_threads` also leaves out CPUs other
processes keep busy (sampled from ``/proc/stat``): a parallel region waits for its slowest thread, so a
thread sharing a CPU with another process slows every region to that process's time slices.
:func:`torch_threads` pins the count for a block, so order-sensitive kernels give thread-independent bytes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from deltakit.errors import UsageError


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``; the previous count is restored on exit.

    The setting is process-wide, so other threads running torch ops meanwhile see it too.
    """
    import torch  # imported here so that the wait-policy helpers run before torch loads

    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def one_thread_on_cpu(device) -> contextlib.AbstractContextManager:
    """:func:`torch_threads` (1) on a CPU ``device``, nothing elsewhere: for numerics whose bits must not
    depend on the thread count (parallel reductions and BLAS kernels sum in an order that changes with
    it; a GPU's result does not depend on the host's thread count)."""
    return torch_threads(1) if getattr(device, "type", device) == "cpu" else contextlib.nullcontext()


#: environment variables naming the thread count or wait policy of the OpenMP / MKL runtimes
_WAIT_POLICY_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` line (``"QUOTA PERIOD"``; ``max`` = no limit) or None."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = no limit)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup (v2 ``cpu.max``, else v1 cfs files) in CPUs, or None."""
    text = _read(root / "cpu.max")
    if text is not None:
        return parse_cpu_max(text)
    for folder in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return parse_cfs(quota, period)
    return None


def affinity_cpus() -> set[int]:
    """CPU ids this process may run on (its affinity mask; all CPUs where the OS has no masks)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def available_cpus(root: Path = CGROUP_ROOT, affinity: set[int] | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    cpus = len(affinity if affinity is not None else affinity_cpus())
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit - 1e-9))
    return max(1, cpus)


def busy_cpus(cpus: set[int], stat: Callable[[], str] | None = None, interval: float = 0.03) -> float:
    """How many of ``cpus`` other work keeps busy: the non-idle share of each, sampled from /proc/stat
    over ``interval`` seconds (0 where /proc/stat cannot be read)."""
    read = stat if stat is not None else (lambda: _read(Path("/proc/stat")) or "")
    first = _cpu_times(read())
    time.sleep(interval)
    second = _cpu_times(read())
    busy = 0.0
    for cpu in cpus:
        if cpu not in first or cpu not in second:
            continue
        total = second[cpu][0] - first[cpu][0]
        idle = second[cpu][1] - first[cpu][1]
        if total > 0:
            busy += max(0.0, min(1.0, 1 - idle / total))
    return busy


def _cpu_times(text: str) -> dict[int, tuple[int, int]]:
    """cpu id -> (total jiffies, idle + iowait jiffies) from /proc/stat text."""
    times = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu") or fields[0] == "cpu":
            continue
        try:
            values = [int(v) for v in fields[1:]]
            cpu = int(fields[0][3:])
        except ValueError:
            continue
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        times[cpu] = (sum(values[:8]), idle)
    return times


def choose_threads(available: int, busy: float) -> int:
    """Intra-op threads for ``available`` CPUs of which ``busy`` are taken by other work: the CPUs that
    are free (a CPU counts as taken from half busy on), at least 1. A parallel region waits for its
    slowest thread, so one thread on a CPU another process holds slows every region down."""
    return max(1, min(available, available - math.floor(busy + 0.5)))


def default_threads(sample: bool = True) -> int:
    """Threads for this process: ``DELTAKIT_THREADS`` when set, else :func:`choose_threads` over the
    available CPUs and (``sample``) how busy they are now."""
    env = os.environ.get("DELTAKIT_THREADS")
    if env:
        return parse_threads(env)
    cpus = affinity_cpus()
    available = available_cpus(affinity=cpus)
    if not sample or available == 1:
        return available
    return choose_threads(available, busy_cpus(cpus))


def parse_threads(value: str | int) -> int:
    """A thread count from ``threads=`` / ``DELTAKIT_THREADS``: a positive integer (UsageError otherwise)."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1:
        raise UsageError(f"threads={value!r}: give a positive number of threads")
    return count


def passive_wait_policy(environ: dict[str, str] | None = None) -> None:
    """Make idle OpenMP / MKL threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``,
    ``KMP_BLOCKTIME=0``), unless the user set them. Only effective before torch starts its thread pool,
    so the command line calls it before importing torch."""
    env = os.environ if environ is None else environ
    for key, value in _WAIT_POLICY_ENV.items():
        env.setdefault(key, value)


def set_threads(threads: int | str | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads`); returns the count."""
    import torch

    count = default_threads() if threads is None else parse_threads(threads)
    torch.set_num_threads(count)
    return count
