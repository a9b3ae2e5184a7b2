"""Put a fleet of fine-tunes into a registry as compressed deltas, in parallel, through the library.

Shows ``deltakit.jobs.compress_fleet`` (one task per fine-tune on a process pool; each delta is pushed as
it finishes), ``deltakit.Registry`` (register the base, list the deltas, resolve one by ``NAME:TAG``), that
a second run resumes by skipping what is already there, and rebuilding one fine-tune from its ref.

    python examples/02_fleet_registry.py --tiny
    python examples/02_fleet_registry.py --base BASE_DIR FT_DIR [FT_DIR ...] --registry REG --method svd
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import deltakit
from deltakit.jobs import FleetOptions, compress_fleet


def run(
    base: Path, finetunes: list[Path], registry_dir: Path, method: str, ratio: float, workers: int
) -> int:
    reg = deltakit.Registry.open(registry_dir)
    reg.add_base("base", base)  # lets `deltakit serve --registry` and others find the base by name
    options = FleetOptions(method=method, ratio=ratio, tag="v1", workers=workers)

    def progress(result, done, total):
        print(f"  [{done}/{total}] {result.status} {result.ref} ({result.stored_bytes} bytes)")

    print(f"compressing {len(finetunes)} fine-tunes with {method} at ratio {ratio} on {workers} workers")
    report = compress_fleet("base", finetunes, reg, options, progress=progress)
    print(
        f"first run: {report.count('pushed')} pushed, {report.count('failed')} failed, {report.wall_s:.1f}s"
    )
    again = compress_fleet("base", finetunes, reg, options)
    print(f"second run: {again.count('skipped')} skipped (already in the registry)")

    for info in reg.ls(base="base"):
        print(f"  {info.ref}: {info.codec}, {info.stored_bytes} bytes, ratio {info.ratio:.3f}")
    first = reg.ls(base="base")[0].ref
    rebuilt = deltakit.apply(reg.resolve_base("base"), reg.resolve_delta(first), None)
    print(f"rebuilt {first}: {rebuilt.tensors} tensors")
    ok = report.ok and again.count("skipped") == len(finetunes) and len(reg.ls(base="base")) == len(finetunes)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finetunes", nargs="*", type=Path)
    parser.add_argument("--base", type=Path)
    parser.add_argument("--registry", type=Path, help="registry directory (default: a temporary one)")
    parser.add_argument("--tiny", action="store_true", help="build a tiny base and three fine-tunes")
    parser.add_argument("--method", default="svd")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if not args.tiny and (args.base is None or not args.finetunes):
        parser.error("give --base and fine-tune directories, or --tiny")
    with tempfile.TemporaryDirectory(prefix="deltakit-example-") as tmp:
        if args.tiny:
            from _tiny import build_fleet

            args.base, args.finetunes = build_fleet(Path(tmp) / "models", 3)
        registry = args.registry or Path(tmp) / "registry"
        return run(args.base, args.finetunes, registry, args.method, args.ratio, args.workers)


if __name__ == "__main__":
    sys.exit(main())
