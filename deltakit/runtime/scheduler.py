"""The request scheduler: one worker thread turns waiting requests into batches.

Each batch is the waiting requests (up to ``max_batch``, after a short gathering window). If they all
name the same model, that delta is swapped in and the batch runs on merged weights (the fast path);
if they name different models, the base stays resident and the batch runs through the multi-delta
path. A request whose delta was unloaded meanwhile fails; nothing falls back to the base.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from deltakit.errors import NotFoundError
from deltakit.runtime.generate import GenerationRequest, GenerationResult, generate
from deltakit.runtime.hotswap import HotSwapRuntime
from deltakit.runtime.multidelta import MultiDeltaExecutor

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One request for the worker: which model (None: base), what to generate, where the result goes."""

    model: str | None
    request: GenerationRequest
    future: Future = field(default_factory=Future)


@dataclass
class BatchRecord:
    """What the worker did with one batch (kept for tests and metrics)."""

    models: list[str | None]
    path: str  # "merged" | "multi"
    seconds: float
    swap_seconds: float


class Scheduler:
    """Owns the worker thread; :meth:`submit` is thread-safe and returns a Future of the result."""

    def __init__(
        self,
        runtime: HotSwapRuntime,
        executor: MultiDeltaExecutor,
        *,
        max_batch: int = 8,
        window_s: float = 0.005,
        history: int = 1024,
    ):
        self.runtime = runtime
        self.executor = executor
        self.max_batch = max_batch
        self.window_s = window_s
        self.batches: list[BatchRecord] = []
        self._history = history
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> None:
        if self._thread is None:
            self._stopped.clear()
            self._thread = threading.Thread(target=self._run, name="deltakit-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopped.set()
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> Future:
        self.start()
        self._queue.put(job)
        return job.future

    def _take_batch(self) -> list[Job]:
        first = self._queue.get()
        if first is None:
            return []
        jobs = [first]
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=max(timeout, 0)) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopped.set()
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while not self._stopped.is_set():
            jobs = self._take_batch()
            if not jobs:
                continue
            try:
                self.run_batch(jobs)
            except Exception as exc:  # the worker must survive anything one batch does
                log.exception("batch failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def run_batch(self, jobs: list[Job]) -> None:
        """Run ``jobs`` as one batch (on the calling thread) and resolve their futures."""
        runtime = self.runtime
        with runtime.lock:
            known = set(runtime.names())
            live = []
            for job in jobs:
                if job.model is not None and job.model not in known:
                    job.future.set_exception(NotFoundError(f"model {job.model!r} was unloaded"))
                else:
                    live.append(job)
            if not live:
                return
            models = [job.model for job in live]
            requests = [job.request for job in live]
            start = time.perf_counter()
            if len(set(models)) == 1:
                stats = runtime.activate(models[0])
                results = generate(runtime.model, runtime.resident.tokenizer, requests)
                path, swap = "merged", stats.seconds
            else:
                with self.executor.assign(models):
                    swap = runtime.history[-1].seconds  # assign() swapped the base in
                    results = generate(runtime.model, runtime.resident.tokenizer, requests)
                path = "multi"
            self.batches.append(BatchRecord(models, path, time.perf_counter() - start, swap))
            del self.batches[: -self._history]
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)


__all__ = ["Job", "Scheduler", "BatchRecord", "GenerationResult"]
