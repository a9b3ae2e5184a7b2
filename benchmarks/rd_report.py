"""The rate–distortion summary of the fleet benchmark: frontier per budget, targets, ablations, times.

Reads the JSON that ``benchmarks/fleet_codecs.py`` wrote for the frontier run (``--frontier``, default
docs/rate_distortion/fleet_benchmark.json) and, when present, for the ablation run (``--ablation``,
default docs/rate_distortion/ablation/fleet_benchmark.json), and the load+save time of the checkpoint
from docs/speed.json; writes docs/rate_distortion/README.md. Every figure comes from those files.

    python benchmarks/rd_report.py [--frontier PATH] [--ablation PATH] [--speed PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (2.0, 1.0, 0.5, 0.25)
#: the issue's targets on the fleet mean of KL closed, per bits per weight
TARGETS = {1.0: 0.995, 0.5: 0.985, 0.25: 0.95}
OURS = ("dqrelo", "deltacome")
BASELINES = ("svd", "dare", "bitdelta")


def budget_of(row: dict) -> float | None:
    """The size target of a row (from its label, e.g. ``1bpw-rd-f4``); None for exact or natural sizes."""
    match = re.match(r"([0-9.]+)bpw", row.get("target_ratio") or "")
    return float(match.group(1)) if match else None


def by_setting(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["name"], []).append(row)
    return out


def mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def fmt(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def frontier_tables(rows: list[dict], variants: list[str]) -> list[str]:
    settings = by_setting(rows)
    lines = [
        "## Every setting (mean over the variants it ran on)",
        "",
        "| setting | variants | bits/w | KL | KL closed | top-1 | compress s | "
        + " | ".join(f"KL closed {v}" for v in variants)
        + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in variants) + " |",
    ]
    order = sorted(settings, key=lambda n: (-(budget_of(settings[n][0]) or 99), n))
    for name in order:
        group = settings[name]
        per = {r["variant"]: r["kl_closed"] for r in group}
        lines.append(
            f"| {name} | {len(group)} | {fmt(mean([r['bits_per_weight'] for r in group]), '.3f')} | "
            f"{fmt(mean([r['kl'] for r in group]))} | {fmt(mean([r['kl_closed'] for r in group]))} | "
            f"{fmt(mean([r['top1'] for r in group]))} | {fmt(mean([r['compress_s'] for r in group]), '.1f')} | "
            + " | ".join(fmt(per.get(v)) for v in variants)
            + " |"
        )
    return lines


def best_of(settings: dict[str, list[dict]], codecs: tuple[str, ...], budget: float, n: int):
    """(name, mean KL closed) of the best setting of ``codecs`` at ``budget`` run on all ``n`` variants."""
    scored = [
        (mean([r["kl_closed"] for r in group]), name)
        for name, group in settings.items()
        if group[0]["codec"] in codecs and budget_of(group[0]) == budget and len(group) == n
    ]
    return max(scored, default=(None, None))


def target_table(rows: list[dict], n: int) -> list[str]:
    settings = by_setting(rows)
    lines = [
        "## Frontier against the targets (fleet mean of KL closed)",
        "",
        f"Only settings that ran on all {n} variants count. deltakit's codecs: {', '.join(OURS)}; "
        f"baselines: {', '.join(BASELINES)} (``svd`` here includes its quantized-factor and allocated "
        "settings, which are deltakit's additions to the baseline).",
        "",
        "| bits/w | target | best deltakit codec | KL closed | best baseline | KL closed | target met | "
        "deltakit ≥ baselines |",
        "| ---: | ---: | --- | ---: | --- | ---: | :---: | :---: |",
    ]
    for budget in BUDGETS:
        ours, our_name = best_of(settings, OURS, budget, n)
        theirs, their_name = best_of(settings, BASELINES, budget, n)
        target = TARGETS.get(budget)
        best = max((v for v in (ours, theirs) if v is not None), default=None)
        met = "–" if target is None or best is None else ("yes" if best >= target else "no")
        beats = "–" if ours is None or theirs is None else ("yes" if ours >= theirs else "no")
        lines.append(
            f"| {budget:g} | {fmt(target, '.3f') if target else '–'} | {our_name or '–'} | {fmt(ours)} | "
            f"{their_name or '–'} | {fmt(theirs)} | {met} | {beats} |"
        )
    return lines


def plot_frontier(rows: list[dict], n: int, path: Path) -> None:
    """KL closed against bits per weight, fleet mean, for each codec's best setting per budget among the
    settings that ran on all ``n`` variants, with the targets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = by_setting(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for codec in (*OURS, *BASELINES):
        points = []
        for budget in BUDGETS:
            best, name = best_of(settings, (codec,), budget, n)
            if best is not None:
                points.append((mean([r["bits_per_weight"] for r in settings[name]]), best))
        if points:
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=codec)
    for budget, target in TARGETS.items():
        ax.plot([budget], [target], marker="*", color="black", markersize=11, linestyle="none")
    ax.plot([], [], marker="*", color="black", linestyle="none", label="target")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per weight (coded bytes of the changed matrices)")
    ax.set_ylabel(f"KL closed, mean of {n} variants")
    ax.set_ylim(0.8, 1.001)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def time_table(rows: list[dict], load_save: float | None) -> list[str]:
    settings = by_setting(rows)
    lines = [
        "## Compress time against loading and saving the checkpoint",
        "",
        "Seconds inside `deltakit compress` (process start excluded), median over the variants; the "
        "benchmark ran beside other work, so these are upper bounds. "
        + (
            f"Load+save of the same checkpoint: {load_save:.2f} s (docs/speed.json, measured alone)."
            if load_save
            else "No load+save figure found (run benchmarks/speed.py)."
        ),
        "",
        "| setting | compress s (median) | × load+save |",
        "| --- | ---: | ---: |",
    ]
    for name, group in sorted(settings.items()):
        median = statistics.median(r["compress_s"] for r in group)
        ratio = f"{median / load_save:.1f}" if load_save else "–"
        lines.append(f"| {name} | {median:.1f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--frontier",
        type=Path,
        nargs="+",
        default=[ROOT / "docs/rate_distortion/fleet_benchmark.json"],
        help="one or more fleet_benchmark.json of the same settings (e.g. variants run as separate jobs)",
    )
    parser.add_argument(
        "--ablation", type=Path, default=ROOT / "docs/rate_distortion/ablation/fleet_benchmark.json"
    )
    parser.add_argument("--speed", type=Path, default=ROOT / "docs/speed.json")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/rate_distortion/README.md")
    parser.add_argument("--note", default="", help="a paragraph printed under the header (e.g. coverage)")
    args = parser.parse_args()
    parts = [json.loads(path.read_text()) for path in args.frontier]
    rows = [row for part in parts for row in part["rows"]]
    frontier = {
        "command": "`; `".join(part["command"] for part in parts),
        "seconds": sum(part["seconds"] for part in parts),
        "machine": parts[0]["machine"],
    }
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    kl_base = {r["variant"]: r["kl_ft_base"] for r in rows}
    load_save = None
    if args.speed.exists():
        load_save = json.loads(args.speed.read_text()).get("apply_compress", {}).get("load_save_s")
    lines = [
        "# Rate–distortion on the SmolLM2-135M fleet",
        "",
        f"Frontier: `{frontier['command']}` ({frontier['seconds'] / 60:.0f} min of benchmark wall time in all, on {frontier['machine']}); "
        "summary by `python benchmarks/rd_report.py`. KL closed = 1 − KL(ft ‖ rebuilt)/KL(ft ‖ base) on "
        "each variant's held-out domain text; bits/w counts every coded byte (codes, scales, float "
        "params) over the weights of the changed matrices.",
        "",
        *([args.note, ""] if args.note else []),
        "| variant | KL(ft ‖ base) |",
        "| --- | ---: |",
        *(f"| {v} | {kl_base[v]:.4f} |" for v in variants),
        "",
        *target_table(rows, len(variants)),
        "",
        "![rate–distortion frontier](frontier.png)",
        "",
        *frontier_tables(rows, variants),
        "",
    ]
    if args.ablation.exists():
        ablation = json.loads(args.ablation.read_text())
        ab_variants = list(dict.fromkeys(r["variant"] for r in ablation["rows"]))
        lines += [
            "# Ablations behind the defaults",
            "",
            f"`{ablation['command']}` ({ablation['seconds'] / 60:.0f} min).",
            "",
            *frontier_tables(ablation["rows"], ab_variants)[2:],
            "",
        ]
    plot_frontier(rows, len(variants), args.out.parent / "frontier.png")
    lines += time_table(rows, load_save)
    lines.append("")
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
