"""Running fleet tasks on Ray: a local cluster, or an existing one joined by address.

Each task reserves ``threads`` CPUs, so Ray packs ``cpus // threads`` tasks per node and the torch threads a
task uses match what it reserved. Workers send the delta files back as bytes, so workers need to see only
the base and fine-tune paths (a shared filesystem on a multi-node cluster), not the parent's work
directory. Results are handed to the parent's collector as each task finishes.
"""

from __future__ import annotations

from typing import Any

from deltakit.errors import UsageError


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("executor='ray' needs Ray: pip install 'deltakit-llm[ray]'") from None
    return ray


def _largest_node_cpus(ray: Any) -> int:
    """CPUs of the cluster's largest live node: a task reserving more would never be scheduled."""
    cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not cpus or max(cpus) < 1:
        raise UsageError("the Ray cluster has no node with a CPU to run fleet tasks on")
    return max(cpus)


def run_ray(todo, base, options, threads: int, collector) -> None:
    """Run one Ray task per item of ``todo``; push results through ``collector`` as they complete.

    Starts a local cluster (``ray.init()``) when Ray is not initialised and no ``options.ray_address`` is
    given, and shuts it down afterwards; a cluster that was already running is left running. Each task
    reserves ``threads`` CPUs (capped at the largest node's), so the cluster's size, not
    ``options.workers``, bounds how many run at once. Ray workers must have deltakit installed.
    """
    ray = _import_ray()
    from deltakit.jobs.fleet_worker import compress_task

    started_here = False
    if not ray.is_initialized():
        if options.ray_address:
            ray.init(address=options.ray_address, log_to_driver=False)
        else:
            ray.init(log_to_driver=False, include_dashboard=False)
        started_here = True
    try:
        threads = min(threads, _largest_node_cpus(ray))
        remote = ray.remote(num_cpus=threads, max_retries=0)(compress_task)
        pending = {
            remote.remote(str(base), str(item.path), None, item.name, options.task_options(), threads): item
            for item in todo
        }
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item = pending.pop(ref)
                try:
                    raw = ray.get(ref)
                except Exception as exc:  # a worker that died (RayTaskError, WorkerCrashedError...)
                    collector.lost(item.name, f"ray task failed: {' '.join(str(exc).split())[:300]}")
                    continue
                collector.finish(raw)
    finally:
        if started_here:
            ray.shutdown()
