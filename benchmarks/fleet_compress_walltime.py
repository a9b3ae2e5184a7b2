"""Wall time of compressing the fleet into a registry: sequential vs the process pool vs Ray.

Each mode runs ``deltakit compress-fleet --json`` into a fresh registry (so nothing is skipped) over the
same fine-tunes: ``--inline`` (one after another in one process, all CPUs for torch), ``--workers N``
(spawned process pool, cpus // N threads each) and ``--ray --workers N`` (a local Ray cluster). Reports
each mode's wall time, the per-fine-tune task times and whether every delta's tensor files are
byte-identical across modes (manifests differ only by their creation time).

    python benchmarks/fleet_compress_walltime.py        # the SmolLM2 fleet built by `deltakit fleet build`
    python benchmarks/fleet_compress_walltime.py --base DIR FT_DIR... --method svd --ratio 1/16 --workers 4

Writes docs/fleet_compress_walltime.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_mode(flags: list[str], base: Path, finetunes: list[Path], common: list[str], registry: Path) -> dict:
    cmd = [sys.executable, "-m", "deltakit_cli.main", "compress-fleet", "--base", str(base),
           *map(str, finetunes), *common, *flags, "--registry", str(registry), "--json"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    report["process_wall_s"] = round(wall, 2)
    return report


def delta_files(registry: Path, results: list[dict]) -> dict[str, object]:
    """``{ref: files}`` (each file's sha256 and size) of every delta a run pushed."""
    import deltakit

    with deltakit.Registry.open(registry) as reg:
        return {r["ref"]: reg.show(r["ref"])["files"] for r in results}


def fleet_paths() -> tuple[Path, list[Path]]:
    from deltakit.zoo.fleet import list_fleet, variant_path

    names = [v["name"] for v in list_fleet()]
    if not names:
        raise SystemExit("no fleet built: run `deltakit fleet build`, or pass --base and fine-tune dirs")
    return variant_path("base"), [variant_path(n) for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("finetunes", nargs="*", type=Path)
    parser.add_argument("--base", type=Path)
    parser.add_argument("--method", default="svd")
    parser.add_argument("--ratio", default="1/16")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="inline,process,ray")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "fleet_compress_walltime.json")
    args = parser.parse_args()
    base, finetunes = (args.base, args.finetunes) if args.base else fleet_paths()
    common = ["--method", args.method, "--ratio", args.ratio]
    flags = {"inline": ["--inline"], "process": ["--workers", str(args.workers)],
             "ray": ["--ray", "--workers", str(args.workers)]}  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory(prefix="deltakit-bench-") as tmp:
        for mode in args.modes.split(","):
            results[mode] = run_mode(flags[mode], base, finetunes, common, Path(tmp) / mode)
            print(
                f"{mode:8s} {results[mode]['wall_s']:8.1f} s  ({results[mode]['threads']} thread(s) per task)"
            )
            results[mode]["files"] = delta_files(Path(tmp) / mode, results[mode]["results"])
    same = len({json.dumps(rep["files"], sort_keys=True) for rep in results.values()}) == 1
    print(f"identical deltas across modes: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "base": str(base),
        "finetunes": [str(f) for f in finetunes],
        "method": args.method,
        "ratio": args.ratio,
        "workers": args.workers,
        "identical_across_modes": same,
        "modes": results,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
