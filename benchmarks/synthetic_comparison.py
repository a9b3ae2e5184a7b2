"""Codec comparison on synthetic fine-tuning deltas, plus randomized-vs-exact SVD timing.

Prints a markdown table (codec, ratio, bytes, relative Frobenius error of the delta, encode time) and
writes it to docs/synthetic_comparison.md together with the command that made it.

    python benchmarks/synthetic_comparison.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/synthetic_comparison.py --quick    # 1024x1024 only, no 4096 SVD timing

The deltas mix a rank-32 part with a decaying spectrum (share ``lowrank`` of the energy), a heavy-tailed
dense part (Student-t, 4 d.o.f.) and 5% sparse outliers; there is no planted sign component.
Base weights are N(0, 0.02²), the delta's RMS is 1e-3, both stored in bf16 for the lossless row.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import fixtures_models as fm  # noqa: E402  (the same generator the tests use)

import deltakit  # noqa: E402
from deltakit.codecs.base import Budget, EncodeContext  # noqa: E402
from deltakit.ops.svd import truncated_svd  # noqa: E402

RUNS = [  # (codec, ratio, config overrides, label)
    ("dqrelo", 1 / 8, {}, "dqrelo"),
    ("svd", 1 / 8, {}, "svd"),
    ("dare", 1 / 8, {}, "dare (random)"),
    ("dare", 1 / 8, {"mode": "magnitude"}, "dare (magnitude)"),
    ("dqrelo", 1 / 16, {}, "dqrelo"),
    ("bitdelta", 1 / 16, {}, "bitdelta"),
    ("svd", 1 / 16, {}, "svd"),
    ("lossless", None, {}, "lossless (bf16)"),
]


def make_pair(rows: int, cols: int, lowrank: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g) * 0.02
    delta = 1e-3 * fm.structured_delta(
        rows, cols, g, rank=32, lowrank=lowrank, sign=0.0, sparse=0.05, dense=0.95 - lowrank, heavy_tail_df=4
    )
    return base, base + delta


def run_codec(name, ratio, overrides, base, target):
    codec = deltakit.get_codec(name)
    config = codec.config_class(**overrides)
    if name == "lossless":  # exact bits of bf16 weights; error measured against the bf16 delta
        base, target = base.to(torch.bfloat16), target.to(torch.bfloat16)
    ctx = EncodeContext(budget=Budget(ratio=ratio), seed=0, name="bench")
    start = time.perf_counter()
    encoded = codec.encode(base, target, config, ctx)
    seconds = time.perf_counter() - start
    delta = codec.decode(encoded, "cpu", base=base)
    error = fm.rel_error(delta, target.float() - base.float())
    return encoded.nbytes, error, seconds


def codec_table(shapes, mixes) -> list[str]:
    lines = [
        "| matrix | low-rank share | codec | ratio | bytes | achieved ratio | rel. Frobenius error | encode s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rows, cols in shapes:
        for lowrank in mixes:
            base, target = make_pair(rows, cols, lowrank)
            fp16 = 2 * rows * cols
            for name, ratio, overrides, label in RUNS:
                nbytes, error, seconds = run_codec(name, ratio, overrides, base, target)
                ratio_txt = f"1/{round(1 / ratio)}" if ratio else "—"
                lines.append(
                    f"| {rows}x{cols} | {lowrank:.1f} | {label} | {ratio_txt} | {nbytes:,} | "
                    f"{nbytes / fp16:.4f} | {error:.4f} | {seconds:.2f} |"
                )
                print(lines[-1], flush=True)
    return lines


def svd_timing(n: int = 4096, rank: int = 128, repeats: int = 1) -> list[str]:
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    v = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    matrix = (u * torch.linspace(10, 1, rank)) @ v.T + 1e-4 * torch.randn(n, n, generator=g)
    lines = [
        f"| method | {n}x{n} rank {rank} seconds | rel. error of the rank-{rank} approximation |",
        "|---|---|---|",
    ]
    for method, kwargs in (("randomized", {"oversample": 10, "power_iters": 2}), ("exact", {})):
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            svd = truncated_svd(matrix, rank, method=method, **kwargs)
            best = min(best, time.perf_counter() - start)
        err = fm.rel_error((svd.U * svd.S) @ svd.Vh, matrix)
        lines.append(f"| {method} | {best:.2f} | {err:.5f} |")
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024 only, skip the 4096 SVD timing")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "synthetic_comparison.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = [(1024, 1024)] if args.quick else [(1024, 1024), (2048, 5632)]
    mixes_for = {(1024, 1024): (0.3, 0.5, 0.7), (2048, 5632): (0.5,)}
    lines = []
    for shape in shapes:
        lines += codec_table([shape], mixes_for[shape])[(0 if not lines else 2) :]
    svd_lines = [] if args.quick else svd_timing()
    command = "python " + " ".join(
        shlex.quote(a) for a in [str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]
    )
    doc = [
        "# Codecs on synthetic deltas",
        "",
        f"Made by `{command}` (deltakit {deltakit.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} CPU threads). Times are wall-clock seconds of one "
        "`encode` call, CPU, fp32 compute; 1-minute load average at the end of the run: "
        f"{os.getloadavg()[0]:.1f} (timings on a shared machine are only indicative).",
        "",
        "Deltas: RMS 1e-3 over N(0, 0.02²) base weights; a rank-32 part with a decaying spectrum takes the",
        "*low-rank share* of the energy, a heavy-tailed dense part (Student-t, 4 d.o.f.) the rest but 5%,",
        "which goes to sparse outliers (1% of entries). No sign pattern is planted. Ratio = bytes / bytes of",
        "the fp16 delta; error = ‖decoded − Δ‖_F / ‖Δ‖_F. `dare (random)` is DARE's drop-and-rescale: unbiased",
        "but its error is √((1−k)/k) ≈ 2.65 at k = 1/8, worse than storing nothing (error 1).",
        "",
        *lines,
        "",
    ]
    if svd_lines:
        doc += [
            "## Truncated SVD, randomized vs exact",
            "",
            "A rank-128 matrix with a linear spectrum (10 → 1) plus N(0, 1e-4²) noise "
            "(noise norm ≈ 0.4 against ≈ 68).",
            "",
            *svd_lines,
            "",
        ]
    doc += [
        "## Reading",
        "",
        "- At 1/8, `dqrelo` has the lowest error while the delta is not very low-rank; as the low-rank share",
        "  grows plain `svd` catches up (see the 0.7 rows): the sign stage spends 1/16 on a part that low rank",
        "  would have captured anyway.",
        "- At 1/16 `dqrelo` has no bytes left for a rank and is exactly `bitdelta` (same signs, same scale);",
        "  on the mostly low-rank delta (0.7) plain `svd` at 1/16 beats both.",
        "- These are reconstruction errors on synthetic matrices, not model quality; see the fleet evaluation.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(doc))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
