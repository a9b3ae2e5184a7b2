"""The packed sign kernel's two forms on SmolLM2's matrix shapes; writes docs/sign_kernel.md and .json.

1. the tile form (few rows) against the table-lookup form (16 rows per vector) for 1 to 64 activation
   rows on one matrix: where they cross decides ``deltakit.ops.signmm.LUT_MIN_ROWS``;
2. one decode step of a mixed batch's sign products (every linear matrix of the 30 layers, 4 deltas,
   ``--rows`` rows each, one :class:`~deltakit.ops.signmm.SignGroup` call per module) and one prefill
   (64 rows per delta).

Random signs and activations (the kernel's time does not depend on the values). Run it alone on the
machine: medians of ``--repeats`` runs.

Usage: python benchmarks/sign_kernel.py [--repeats 15] [--rows 2] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from deltakit.ops import signmm
from deltakit.ops.bitpack import pack_signs
from deltakit.ops.threads import available_cpus, set_threads

#: (out, in) of SmolLM2-135M's linear matrices in one decoder layer: q, o, k, v, gate, up, down
LAYER = [(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)]
LAYERS = 30
ROW_COUNTS = (1, 2, 4, 8, 16, 24, 32, 64)


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def crossover(repeats: int) -> list[dict]:
    """Microseconds per call of each form, for each shape and row count."""
    lib = signmm.native_library()
    threads = torch.get_num_threads()
    rows_out = []
    generator = torch.Generator().manual_seed(0)
    for shape in sorted(set(LAYER)):
        packed = pack_signs(torch.randn(*shape, generator=generator))
        tiles = signmm.sign_tiles(packed, shape)
        for n in ROW_COUNTS:
            x = torch.randn(n, shape[1], generator=generator)
            y = torch.empty(n, shape[0])

            def tile_call(x=x, y=y, n=n, shape=shape, tiles=tiles):
                lib.deltakit_sign_matmul_tiles(
                    x.data_ptr(), n, shape[1], tiles.data_ptr(), shape[0], y.data_ptr(), threads
                )

            def lut_call(x=x, y=y, n=n, shape=shape, packed=packed):
                lib.deltakit_sign_matmul_lut(
                    x.data_ptr(), n, shape[1], packed.data_ptr(), shape[0], y.data_ptr(), threads
                )

            rows_out.append(
                {
                    "shape": list(shape),
                    "rows": n,
                    "tile_us": median_s(tile_call, repeats) * 1e6,
                    "lut_us": median_s(lut_call, repeats) * 1e6,
                }
            )
    return rows_out


def mixed_step(rows: int, repeats: int) -> float:
    """Seconds of the sign products of one forward pass: 4 deltas x ``rows`` rows, every matrix."""
    generator = torch.Generator().manual_seed(1)
    calls = []
    for shape in LAYER * LAYERS:
        packs = [pack_signs(torch.randn(*shape, generator=generator)) for _ in range(4)]
        row_lists = [[p * rows + r for r in range(rows)] for p in range(4)]
        group = signmm.SignGroup(packs, shape, row_lists, [0.5, -0.25, 2.0, 1.0])
        x = torch.randn(4 * rows, shape[1], generator=generator)
        calls.append((group, x, torch.zeros(4 * rows, shape[0])))

    def step() -> None:
        for group, x, y in calls:
            group.add_into(x, y)

    return median_s(step, repeats)


def report(result: dict) -> str:
    lines = [
        "# Packed sign kernel: tile form against table form",
        "",
        f"Machine: {result['machine']}, {result['cpus']} usable CPUs, torch threads {result['threads']}. "
        f"Command: `{result['command']}` (alone on the machine, medians).",
        "",
        "## Per call, one matrix (microseconds)",
        "",
        "| shape (out, in) | rows | tile form | table form | faster |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in result["crossover"]:
        faster = "tile" if r["tile_us"] <= r["lut_us"] else "table"
        lines.append(
            f"| {tuple(r['shape'])} | {r['rows']} | {r['tile_us']:.1f} | {r['lut_us']:.1f} | {faster} |"
        )
    step = result["mixed"]
    lines += [
        "",
        f"`LUT_MIN_ROWS` = {result['lut_min_rows']}: fewer rows per delta take the tile form.",
        "",
        "## A mixed batch's sign products (4 deltas, every linear matrix of the 30 layers)",
        "",
        f"- decode step, {step['rows']} rows per delta: {step['decode_ms']:.2f} ms",
        f"- prefill, 64 rows per delta: {step['prefill_ms']:.1f} ms",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rows", type=int, default=2, help="rows per delta of the decode step")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    set_threads()
    if signmm.native_library() is None:
        raise SystemExit("error: the sign kernel is not available (no C compiler, or DELTAKIT_NATIVE=0)")
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpus": available_cpus(),
        "threads": torch.get_num_threads(),
        "command": f"python benchmarks/sign_kernel.py --repeats {args.repeats} --rows {args.rows}",
        "lut_min_rows": signmm.LUT_MIN_ROWS,
        "crossover": crossover(args.repeats),
        "mixed": {
            "rows": args.rows,
            "decode_ms": mixed_step(args.rows, args.repeats) * 1e3,
            "prefill_ms": mixed_step(64, max(3, args.repeats // 3)) * 1e3,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sign_kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "sign_kernel.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
