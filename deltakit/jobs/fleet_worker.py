"""The task one fleet worker runs: compress one fine-tune against the base into a delta directory.

Everything here crosses a process boundary (a spawned pool worker or a Ray worker), so arguments and
results are plain strings, numbers, dicts and bytes; exceptions never escape a task, they come back as
a one-line ``error`` with the exit code deltakit would use for them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from deltakit.ops.threads import available_cpus


def threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """``max(1, cpus // workers)``: torch threads each of ``workers`` parallel workers may use."""
    return max(1, (available_cpus() if cpus is None else cpus) // max(1, workers))


def init_worker(threads: int) -> None:
    """Pool initializer: cap torch's intra-op threads so parallel workers do not oversubscribe the CPUs."""
    import torch

    torch.set_num_threads(threads)


def _delta_files(root: Path) -> dict[str, bytes]:
    """Every file under a delta directory, by path relative to it (for results sent back over Ray)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def compress_task(
    base: str, target: str, out_dir: str | None, name: str, options: dict[str, Any], threads: int
) -> dict[str, Any]:
    """Compress fine-tune ``target`` against ``base`` with ``options`` (method, ratio, rank, overrides, seed).

    out_dir: where to write the delta directory; ``None`` writes it to a temporary directory and returns
    its files as bytes under ``files`` (for workers that share no filesystem with the parent).
    Returns ``{"name", "ok", "seconds", "threads", "error", "exit_code", "files"}`` (``threads``: torch's
    thread count during the task); never raises.
    """
    started = time.perf_counter()
    result: dict[str, Any] = {"name": name, "ok": False, "error": None, "exit_code": 0, "files": None,
                              "threads": None}  # fmt: skip
    try:
        init_worker(threads)
        from deltakit.core.compress import compress

        def run(output: Path) -> None:
            compress(
                base,
                target,
                output,
                method=options["method"],
                ratio=options.get("ratio"),
                rank=options.get("rank"),
                overrides=options.get("overrides") or None,
                seed=int(options.get("seed", 0)),
                target_name=name,
                overwrite=True,
            )

        if out_dir is not None:
            run(Path(out_dir))
        else:
            with tempfile.TemporaryDirectory(prefix="deltakit-fleet-") as tmp:
                run(Path(tmp) / "delta")
                result["files"] = _delta_files(Path(tmp) / "delta")
        result["ok"] = True
    except Exception as exc:  # reported per fine-tune; the other tasks go on
        from deltakit.errors import DeltakitError

        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, DeltakitError):
            result.update(error=message, exit_code=exc.exit_code)
        elif isinstance(exc, OSError):
            result.update(error=message, exit_code=1)
        else:
            result.update(error=f"{type(exc).__name__}: {message}", exit_code=1)
    result["seconds"] = round(time.perf_counter() - started, 3)
    if "torch" in sys.modules:
        result["threads"] = sys.modules["torch"].get_num_threads()  # what the task actually ran with
    return result
