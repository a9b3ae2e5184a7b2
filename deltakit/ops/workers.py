"""Per-tensor work on several CPU threads, results in input order, bytes independent of the worker count.

Compress, the size survey and apply handle one tensor at a time, and the numerics of each tensor run at
one intra-op thread so that its bytes do not depend on the thread count (:mod:`deltakit.ops.threads`).
That leaves all but one core idle. :func:`ordered_map` instead runs that many tensors side by side, one
torch thread each: every tensor is computed exactly as it would be alone (the same kernels at one
thread), so the output is the same for any worker count, and the caller consumes results in input order
(shards, manifests and progress come out as in a serial run).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

#: most tensors handled side by side (each worker holds a tensor pair and the work on it)
MAX_WORKERS = 8
#: bytes all queued items may hold together before more than ``workers + 1`` are kept
#: (:func:`ordered_map`'s ``cost``)
AHEAD_BYTES = 256 << 20

Item = TypeVar("Item")
Result = TypeVar("Result")


def _one_torch_thread() -> None:
    """Worker-thread initializer: MKL keeps its thread count per OS thread, and a new thread whose first
    torch op is a BLAS call runs it at the machine's default whatever the process set, so each worker
    sets its own."""
    import torch

    torch.set_num_threads(1)


def tensor_bytes(item: tuple) -> int:
    """Bytes of the torch tensors among ``item``'s fields (other fields count nothing): the ``cost`` of
    an item of :func:`ordered_map` that carries its tensors."""
    import torch

    return sum(x.nbytes for x in item if isinstance(x, torch.Tensor))


def cpu_workers(device) -> int:
    """Workers for per-tensor work on ``device`` (a torch.device or its type name): torch's thread count
    on the CPU, at most MAX_WORKERS; one on an accelerator, whose kernels are queued in order anyway."""
    import torch

    if getattr(device, "type", device) != "cpu":
        return 1
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


def ordered_map(
    fn: Callable[[Item], Result],
    items: Iterable[Item],
    workers: int,
    *,
    ahead: int | None = None,
    cost: Callable[[Item], int] | None = None,
    ahead_bytes: int = AHEAD_BYTES,
) -> Iterator[Result]:
    """Yield ``fn(item)`` for each item, in the order of ``items``.

    workers: threads computing ``fn`` (each at one torch intra-op thread); ``<= 1`` runs ``fn`` in the
    caller's thread, one item at a time, as a plain loop would. ahead: items drawn and not yet yielded at
    most (default ``2 * workers + 2``): with more items queued than workers, a worker that finishes a
    small item starts the next one while the oldest, larger one is still running, instead of waiting for
    it to be consumed. cost: bytes an item holds until its result is consumed (its tensors and its
    result's); more than ``workers + 1`` items stay queued only while they hold at most
    ``ahead_bytes`` together, which bounds the memory when tensors are large (the
    next item is drawn before its cost is known, so the peak is that bound plus one item). ``items`` is
    drawn lazily in the caller's thread, so reading inputs and ordered side effects stay there. An
    exception raised by ``fn`` surfaces when its item's turn comes (the first failing item in input
    order wins among ``fn``'s errors; an error raised while drawing an item surfaces at once, possibly
    before an earlier item's); items not yet started are cancelled and the threads are joined before
    it propagates, also when the consumer stops early. The caller's torch thread count is restored when
    the map ends.
    """
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    import torch

    previous = torch.get_num_threads()  # the workers set the process-wide count too; restored at the end
    limit = max(1, ahead if ahead is not None else 2 * workers + 2)
    floor = min(limit, workers + 1)  # queued regardless of their bytes
    pending: deque[tuple[Future[Result], int]] = deque()
    held = 0  # bytes of the items in ``pending``
    pool = ThreadPoolExecutor(workers, thread_name_prefix="deltakit-work", initializer=_one_torch_thread)
    try:
        for item in items:
            size = cost(item) if cost is not None else 0
            pending.append((pool.submit(fn, item), size))
            held += size
            while len(pending) >= limit or (len(pending) >= floor and held > ahead_bytes):
                future, size = pending.popleft()
                held -= size
                yield future.result()
        while pending:
            yield pending.popleft()[0].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # items not yet started never run
        torch.set_num_threads(previous)
