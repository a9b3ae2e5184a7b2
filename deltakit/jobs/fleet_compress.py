"""Compressing a fleet of fine-tunes against one base into the registry, in parallel.

One task per fine-tune runs in a worker (a spawned process pool by default, Ray when asked, or inline);
the parent process owns the registry and pushes each delta as soon as its task finishes, so a failure
or a crash later in the run loses nothing already pushed. A fine-tune whose ``NAME:TAG`` is already in
the registry with the same base fingerprint is skipped, which makes an interrupted run resumable.
Each worker caps torch at ``max(1, cpus // workers)`` threads so parallel workers do not oversubscribe.

>>> from deltakit.jobs import FleetOptions, compress_fleet
>>> report = compress_fleet("base/", ["ft/chat", "ft/code"], "reg/", FleetOptions(method="svd", ratio=1/8))
>>> report.ok, [r.status for r in report.results]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from deltakit.errors import DeltakitError, UsageError
from deltakit.jobs.fleet_worker import compress_task, threads_per_worker

EXECUTORS = ("process", "ray", "inline")


class FleetError(DeltakitError):
    """One or more fine-tunes of a fleet run failed (the others were pushed)."""

    exit_code = 1


@dataclass(frozen=True)
class FleetItem:
    """One fine-tune: the delta ``name`` it is pushed under and its checkpoint directory ``path``."""

    name: str
    path: Path


@dataclass(frozen=True)
class FleetOptions:
    """How every fine-tune is compressed and where it goes.

    method, ratio, rank, overrides, seed: as in :func:`deltakit.compress`.
    tag: registry tag of every delta (``NAME:TAG``). workers: parallel tasks (on Ray it only sets the
    default thread count; the cluster's CPUs bound concurrency). threads: torch threads per worker
    (default ``max(1, cpus // workers)``, cpus from this process's affinity mask).
    executor: ``process``, ``ray`` or ``inline``.
    ray_address: Ray cluster to join (default: start a local one unless Ray is already initialised).
    overwrite: recompress a ``NAME:TAG`` that exists with another base instead of failing it.
    """

    method: str = "dqrelo"
    ratio: float | None = None
    rank: int | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    tag: str = "latest"
    workers: int = 2
    threads: int | None = None
    executor: str = "process"
    ray_address: str | None = None
    overwrite: bool = False

    def validate(self) -> None:
        """Raise UsageError on values that cannot work together."""
        if self.executor not in EXECUTORS:
            raise UsageError(f"executor={self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.workers < 1:
            raise UsageError(f"workers={self.workers}: must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads={self.threads}: must be at least 1")
        if self.ratio is not None and self.rank is not None:
            raise UsageError("give ratio or rank, not both")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise UsageError(f"ratio={self.ratio}: must be in (0, 1]")
        if self.ray_address is not None and self.executor != "ray":
            raise UsageError("ray_address needs executor='ray'")

    def task_options(self) -> dict[str, Any]:
        """The plain dict a worker task receives."""
        return {"method": self.method, "ratio": self.ratio, "rank": self.rank,
                "overrides": dict(self.overrides), "seed": self.seed}  # fmt: skip


@dataclass(frozen=True)
class ItemResult:
    """What happened to one fine-tune. status: ``pushed``, ``skipped`` or ``failed``."""

    name: str
    ref: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    exit_code: int = 0
    manifest: str | None = None
    stored_bytes: int | None = None
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class FleetReport:
    """Every fine-tune's result, in the order they finished, and the run's wall time."""

    base: str
    base_fingerprint: str
    executor: str
    workers: int
    threads: int
    results: list[ItemResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when no fine-tune failed."""
        return all(r.status != "failed" for r in self.results)

    def count(self, status: str) -> int:
        """How many fine-tunes ended with ``status``."""
        return sum(r.status == status for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (stable schema of ``compress-fleet --json``)."""
        counts = {s: self.count(s) for s in ("pushed", "skipped", "failed")}
        return {"base": self.base, "base_fingerprint": self.base_fingerprint, "executor": self.executor,
                "workers": self.workers, "threads": self.threads, "wall_s": self.wall_s, "ok": self.ok,
                "counts": counts, "results": [r.to_dict() for r in self.results]}  # fmt: skip


Progress = Callable[[ItemResult, int, int], None]
"""Called in the parent as each fine-tune finishes: ``progress(result, done, total)``."""


def plan_items(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[FleetItem]:
    """Fleet items from fine-tune directories; delta names default to the directory names.

    Raises UsageError on duplicate or invalid names (before any work starts).
    """
    from deltakit.registry import validate_name

    if names is not None and len(names) != len(paths):
        raise UsageError(f"names: {len(names)} given for {len(paths)} fine-tunes")
    items, seen = [], set()
    for i, path in enumerate(paths):
        path = Path(path)
        name = names[i] if names is not None else path.resolve().name
        validate_name(name, "delta name")
        if name in seen:
            raise UsageError(f"two fine-tunes would be pushed as {name!r}; give distinct names")
        seen.add(name)
        items.append(FleetItem(name, path))
    return items


def _resolve_base(registry, base: str | Path) -> tuple[Path, str]:
    """(checkpoint dir, fingerprint) of a base directory, or of a base registered under that name."""
    path = Path(base)
    if path.is_dir():
        from deltakit.format.fingerprint import checkpoint_fingerprint

        return path, checkpoint_fingerprint(path)
    return registry.resolve_base(str(base)), registry.get_base(str(base)).fingerprint


def _existing(registry, ref: str):
    from deltakit.errors import NotFoundError

    try:
        return registry.show_info(ref)
    except NotFoundError:
        return None


def _safe_rel(rel: str) -> PurePosixPath:
    parts = PurePosixPath(rel)
    if parts.is_absolute() or not parts.parts or any(p in ("", ".", "..") for p in parts.parts):
        raise UsageError(f"worker returned an unsafe file path {rel!r}")
    return parts


def _materialise_files(files: dict[str, bytes], out_dir: Path) -> None:
    """Write the delta files a remote worker sent back under ``out_dir``."""
    for rel, data in files.items():
        dst = out_dir.joinpath(*_safe_rel(rel).parts)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)


class _Collector:
    """Turns worker results into registry pushes and :class:`ItemResult` records (runs in the parent)."""

    def __init__(self, registry, report: FleetReport, work: Path, tag: str, total: int, progress) -> None:
        self.registry, self.report, self.work, self.tag = registry, report, work, tag
        self.total, self.progress = total, progress

    def out_dir(self, name: str) -> Path:
        """Work directory of one task (names may hold '/', which never appears as '+' in a name)."""
        return self.work / name.replace("/", "+")

    def record(self, result: ItemResult) -> None:
        self.report.results.append(result)
        if self.progress is not None:
            self.progress(result, len(self.report.results), self.total)

    def finish(self, raw: dict[str, Any]) -> None:
        """Push a finished task's delta (or record its failure), then drop its work directory."""
        name = raw["name"]
        ref = f"{name}:{self.tag}"
        out_dir = self.out_dir(name)
        if not raw["ok"]:
            self.record(ItemResult(name, ref, "failed", raw["seconds"], raw["error"], raw["exit_code"],
                                   threads=raw.get("threads")))  # fmt: skip
            shutil.rmtree(out_dir, ignore_errors=True)
            return
        try:
            if raw.get("files") is not None:
                _materialise_files(raw["files"], out_dir)
            info = self.registry.push(out_dir, ref)
            self.record(ItemResult(name, ref, "pushed", raw["seconds"], manifest=info.manifest,
                                   stored_bytes=info.stored_bytes, threads=raw.get("threads")))  # fmt: skip
        except (DeltakitError, OSError) as exc:
            code = getattr(exc, "exit_code", 1)
            self.record(ItemResult(name, ref, "failed", raw["seconds"], f"push: {exc}", code))
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)

    def lost(self, name: str, message: str) -> None:
        """A task whose worker died without a result."""
        self.record(ItemResult(name, f"{name}:{self.tag}", "failed", 0.0, message, 1))


def _todo(registry, items, fingerprint: str, options: FleetOptions, collector: _Collector) -> list:
    """Items still to compress; records the skipped (same base) and refused (other base) ones."""
    todo = []
    for item in items:
        ref = f"{item.name}:{options.tag}"
        info = _existing(registry, ref)
        if info is None or (info.base_fingerprint != fingerprint and options.overwrite):
            todo.append(item)
        elif info.base_fingerprint == fingerprint:
            collector.record(ItemResult(item.name, ref, "skipped", manifest=info.manifest,
                                        stored_bytes=info.stored_bytes))  # fmt: skip
        else:
            collector.lost(
                item.name,
                f"{ref} is already in the registry from another base "
                f"({info.base_fingerprint}); pass overwrite=True to replace it",
            )
    return todo


def _run_process(todo, base: Path, options: FleetOptions, threads: int, collector: _Collector) -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from deltakit.jobs.fleet_worker import init_worker

    context = multiprocessing.get_context("spawn")
    workers = min(options.workers, len(todo))
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=init_worker, initargs=(threads,)
    ) as pool:
        futures = {
            pool.submit(compress_task, str(base), str(item.path), str(collector.out_dir(item.name)),
                        item.name, options.task_options(), threads): item
            for item in todo
        }  # fmt: skip
        try:
            for future in as_completed(futures):
                try:
                    raw = future.result()
                except BrokenProcessPool as exc:
                    collector.lost(futures[future].name, f"worker process died: {exc}")
                    continue
                collector.finish(raw)
        except BaseException:  # Ctrl-C or a failing push: do not start the queued tasks
            for future in futures:
                future.cancel()
            raise


def _run_inline(todo, base: Path, options: FleetOptions, threads: int, collector: _Collector) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        for item in todo:
            raw = compress_task(str(base), str(item.path), str(collector.out_dir(item.name)), item.name,
                                options.task_options(), threads)  # fmt: skip
            collector.finish(raw)
    finally:
        torch.set_num_threads(before)


def compress_fleet(
    base: str | Path,
    finetunes: Sequence[str | Path] | Sequence[FleetItem],
    registry: Any,
    options: FleetOptions | None = None,
    *,
    progress: Progress | None = None,
    work_dir: str | Path | None = None,
) -> FleetReport:
    """Compress every fine-tune against ``base`` and push each delta into ``registry`` as ``NAME:TAG``.

    base: a checkpoint directory or the name of a base registered in ``registry``.
    finetunes: checkpoint directories (named after the directory) or :class:`FleetItem` records.
    registry: a :class:`deltakit.Registry` or the path of one (created if absent).
    work_dir: where workers write deltas before the push (default: a temporary directory).
    Failures are recorded per fine-tune in the report (never raised); the caller decides what a failed
    item means. Raises UsageError on bad options or duplicate names, before any work starts.
    """
    from deltakit.registry import Registry

    options = options or FleetOptions()
    options.validate()
    paths = [f.path if isinstance(f, FleetItem) else Path(f) for f in finetunes]
    names = [f.name if isinstance(f, FleetItem) else Path(f).resolve().name for f in finetunes]
    items = plan_items(paths, names)
    reg = registry if isinstance(registry, Registry) else Registry.open(registry)
    started = time.perf_counter()
    base_dir, fingerprint = _resolve_base(reg, base)
    threads = options.threads or threads_per_worker(1 if options.executor == "inline" else options.workers)
    report = FleetReport(str(base), fingerprint, options.executor, options.workers, threads)
    with tempfile.TemporaryDirectory(prefix="deltakit-fleet-", dir=work_dir) as work:
        collector = _Collector(reg, report, Path(work), options.tag, len(items), progress)
        todo = _todo(reg, items, fingerprint, options, collector)
        if todo:
            if options.executor == "process":
                _run_process(todo, base_dir, options, threads, collector)
            elif options.executor == "ray":
                from deltakit.jobs.fleet_ray import run_ray

                run_ray(todo, base_dir, options, threads, collector)
            else:
                _run_inline(todo, base_dir, options, threads, collector)
    report.wall_s = round(time.perf_counter() - started, 3)
    return report
