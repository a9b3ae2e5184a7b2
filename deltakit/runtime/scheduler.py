"""The request scheduler: one worker thread turns waiting requests into batches.

Each batch is the waiting requests (up to ``max_batch``, after a short gathering window). If they all
name the same model, that delta is swapped in and the batch runs on merged weights (the fast path);
if they name different models, the base stays resident and the batch runs through the multi-delta
path. A request whose delta was unloaded meanwhile fails; nothing falls back to the base.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, fields

from deltakit.errors import NotFoundError, UsageError
from deltakit.runtime.generate import GenerationRequest, GenerationResult, generate
from deltakit.runtime.hotswap import HotSwapRuntime
from deltakit.runtime.multidelta import MultiDeltaExecutor
from deltakit.runtime.sampling import SamplingParams

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
    finish_reasons: list[str] = field(default_factory=list)  # per request, in order


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
                    _fail(job, exc)

    def run_batch(self, jobs: list[Job]) -> None:
        """Run ``jobs`` as one batch (on the calling thread) and resolve their futures.

        Isolation: a job that cannot run (unknown or unloadable model, invalid parameters) fails alone
        before the batch starts; if the batched generation itself raises, every job is re-run alone so
        only the job that fails on its own gets the error (a job that already streamed text gets the
        batch's error instead: re-running it would repeat that text).
        """
        runtime = self.runtime
        with runtime.lock:
            live = [job for job in jobs if self._admit(job)]
            if not live:
                return
            try:
                self._generate(live)
            except Exception as exc:
                log.warning("a batch of %d request(s) failed", len(live), exc_info=True)
                if len(live) == 1:
                    _fail(live[0], exc)
                    return
                for job in live:
                    if job.request.streamed:  # its client already has part of the text: not re-run
                        _fail(job, exc)
                        continue
                    try:
                        self._generate([job])
                    except Exception as alone:
                        _fail(job, alone)

    def _admit(self, job: Job) -> bool:
        """Whether ``job`` may join the batch; if not, its future gets the reason."""
        if job.future.done():  # cancelled by its caller while waiting
            return False
        if job.request.cancel.is_set():  # its client left while it waited
            _fail(job, UsageError("the request was cancelled before it ran"))
            return False
        try:
            if job.model is not None:
                if job.model not in self.runtime.entries:
                    raise NotFoundError(f"model {job.model!r} was unloaded")
                self.runtime.device_delta(job.model)  # read (and check) it now: a broken delta fails alone
            params = job.request.params
            SamplingParams(**{f.name: getattr(params, f.name) for f in fields(params)})  # re-validated
            if not job.request.prompt_ids:
                raise UsageError("the prompt is empty")
        except Exception as exc:
            _fail(job, exc)
            return False
        return True

    def waiting_models(self) -> list[str | None]:
        """Models of the requests queued behind the running batch, in arrival order."""
        with self._queue.mutex:
            return [job.model for job in self._queue.queue if job is not None]

    def _generate(self, live: list[Job]) -> None:
        runtime = self.runtime
        models = [job.model for job in live]
        runtime.prefetch([m for m in self.waiting_models() if m not in models])  # read while this runs
        requests = [job.request for job in live]
        start = time.perf_counter()
        if len(set(models)) == 1:
            try:
                stats = runtime.activate(models[0])
            except Exception as exc:  # every job asked for this delta; the runtime rolled back
                for job in live:
                    _fail(job, exc)
                return
            results = generate(runtime.model, runtime.resident.tokenizer, requests)
            path, swap = "merged", stats.seconds
        else:
            with self.executor.assign(models):
                swap = runtime.history[-1].seconds  # assign() swapped the base in
                results = generate(runtime.model, runtime.resident.tokenizer, requests)
            path = "multi"
        finish = [r.finish_reason for r in results]
        self.batches.append(BatchRecord(models, path, time.perf_counter() - start, swap, finish))
        del self.batches[: -self._history]
        for job, result in zip(live, results, strict=True):
            if result.error is not None:  # this row alone failed (non-finite logits)
                _fail(job, result.error)
                continue
            with contextlib.suppress(InvalidStateError):  # cancelled by its caller meanwhile
                job.future.set_result(result)


def _fail(job: Job, exc: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        job.future.set_exception(exc)


__all__ = ["Job", "Scheduler", "BatchRecord", "GenerationResult"]
