"""Side-by-side codec benchmark on the real SmolLM2 fleet.

For every registered data-free delta codec at ratios 1/8, 1/16 and 1/32 of the fp16 delta (where the
codec reaches them) and for ``lossless``, on every variant of the fleet: stored size, ratio, bits per
weight, compress and apply time, peak memory (each step a ``deltakit`` process under
``/usr/bin/time -v``), and the evaluation against the fine-tune (``deltakit.eval.evaluate_delta``):
perplexity, KL(fine-tune ‖ reconstruction), KL closed, top-1 agreement and gain kept on the variant's
held-out domain text, and perplexity on general text (base retention).

With ``--bits-per-weight 2,1,0.5,0.25`` the settings are size targets instead (``--bits-per-weight B``
with ``--allocation uniform`` and ``rd`` where the codec takes part), and ``--factor-bits 16,4,3`` adds
the low-rank codecs at each factor width (``--set factor_bits=N``).

Writes docs/fleet_benchmark.json, docs/fleet_benchmark.md and docs/fleet_benchmark.png.

    python benchmarks/fleet_codecs.py [--variants a,b] [--max-tokens 2048] [--methods dqrelo,svd,...]
        [--bits-per-weight 2,1,0.5,0.25] [--factor-bits 16,4,3] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATIOS = {"1/8": 1 / 8, "1/16": 1 / 16, "1/32": 1 / 32}


def run_timed(cmd: list[str]) -> tuple[dict, float, float]:
    """Run a ``deltakit ... --json`` command under /usr/bin/time -v: (its JSON, wall s, peak RSS MiB)."""
    started = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    return json.loads(proc.stdout), wall, rss


def reachable(method: str, ratio: float) -> bool:
    from deltakit import Budget, get_codec
    from deltakit.errors import BudgetError

    try:
        get_codec(method).check_budget(Budget(ratio=ratio))
    except BudgetError:
        return False
    return True


def settings_for(
    methods: list[str], bits: list[float] | None = None, factor_bits: list[int] | None = None
) -> list[tuple[str, str | None, list[str]]]:
    """(codec, label, extra compress arguments) per setting: ratios, or size targets when ``bits``."""
    from deltakit import get_codec

    out: list[tuple[str, str | None, list[str]]] = []
    for method in methods:
        if method == "lossless":
            out.append((method, None, []))
            continue
        if not bits:
            out.extend(
                (method, label, ["--ratio", label]) for label, r in RATIOS.items() if reachable(method, r)
            )
            continue
        codec = get_codec(method)
        lowrank = any(f["name"] == "factor_bits" for f in codec.config_class.describe())
        widths = factor_bits if lowrank and factor_bits else [None]
        allocations = ["uniform", "rd"] if codec.allocatable else ["uniform"]
        if not codec.allocatable and not any(reachable(method, min(1.0, b / 16)) for b in bits):
            out.append((method, "natural", []))  # a fixed-size codec (bitdelta): its own size
            continue
        for b in bits:
            if not reachable(method, min(1.0, b / 16)):
                continue
            for width in widths:
                for allocation in allocations:
                    if allocation == "uniform" and method == "deltacome":
                        continue  # its size is data-dependent: rd only
                    extra = ["--bits-per-weight", f"{b:g}", "--allocation", allocation]
                    label = f"{b:g}bpw-{allocation}"
                    if width is not None:
                        extra += ["--set", f"factor_bits={width}"]
                        label += f"-f{width}"
                    out.append((method, label, extra))
    return out


def bench_variant(variant: dict, base: Path, settings, work: Path, max_tokens: int, log) -> list[dict]:
    from deltakit.eval.report import evaluate_delta

    ft = Path(variant["path"])
    cli = [sys.executable, "-m", "deltakit_cli.main"]
    rows, candidates = [], {}
    for method, label, extra in settings:
        name = f"{method}@{label}" if label else method
        delta, rebuilt = work / f"delta-{method}-{(label or 'x').replace('/', '_')}", work / f"out-{name}"
        cmd = [*cli, "compress", "-m", method, "--base", str(base), str(ft), "-o", str(delta), "--json"]
        cmd += [arg.replace("{train}", variant["train_path"]) for arg in extra]
        try:
            result, compress_wall, compress_rss = run_timed(cmd)
        except RuntimeError as exc:  # e.g. a sign codec at exactly 1 bit/weight: its scales do not fit
            log(f"  {variant['name']} {name}: skipped ({str(exc).strip().splitlines()[-1]})")
            continue
        applied, apply_wall, apply_rss = run_timed(
            [*cli, "apply", str(base), str(delta), "-o", str(rebuilt), "--fingerprint", "--json"]
        )
        stats = result["stats"]
        encoded_params = stats["fp16_delta_bytes"] / 2
        coded = stats["encoded_bytes"] + stats["param_bytes"]
        rows.append(
            {
                "variant": variant["name"],
                "codec": method,
                "target_ratio": label,
                "name": name,
                "stored_bytes": stats["stored_bytes"],
                "coded_bytes": coded,
                "ratio": stats["ratio"],
                "bits_per_weight": 8 * coded / encoded_params if encoded_params else None,
                "compress_s": result["seconds"],
                "compress_wall_s": round(compress_wall, 2),
                "compress_peak_rss_mib": round(compress_rss),
                "apply_s": applied["seconds"],
                "apply_wall_s": round(apply_wall, 2),
                "apply_peak_rss_mib": round(apply_rss),
                "bit_exact": applied["matches_target"],
            }
        )
        candidates[name] = rebuilt
        log(
            f"  {variant['name']} {name}: ratio {stats['ratio']:.4f}, compress {result['seconds']:.1f}s, "
            f"apply {applied['seconds']:.1f}s"
        )
    report = evaluate_delta(base, ft, candidates, max_tokens=max_tokens, weights=True, progress=None)
    for row in rows:
        for text, entry in report["texts"].items():
            metrics = entry["candidates"][row["name"]]
            prefix = "domain" if entry["kind"] == "domain" else "general"
            row[f"{prefix}_ppl"] = metrics["ppl"]
            if prefix == "domain":
                row.update(
                    kl=metrics["kl"],
                    kl_closed=metrics["kl_closed"],
                    top1=metrics["top1"],
                    gain_kept=metrics["gain_kept"],
                    ppl_base=entry["ppl_base"],
                    ppl_finetune=entry["ppl_finetune"],
                    kl_ft_base=entry["kl_ft_base"],
                    text=text,
                )
            else:
                row.update(general_ppl_base=entry["ppl_base"], general_ppl_finetune=entry["ppl_finetune"])
        row["weight_rel_error"] = report["weights"][row["name"]]["overall"]
    for path in candidates.values():
        shutil.rmtree(path, ignore_errors=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean of each metric over variants, per (codec, target ratio)."""
    keys = [
        "ratio",
        "bits_per_weight",
        "gain_kept",
        "kl",
        "kl_closed",
        "top1",
        "domain_ppl",
        "general_ppl",
        "weight_rel_error",
        "compress_s",
        "apply_s",
        "compress_peak_rss_mib",
        "apply_peak_rss_mib",
        "stored_bytes",
    ]
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        group = [r for r in rows if r["name"] == name]
        summary = {
            "name": name,
            "codec": group[0]["codec"],
            "target_ratio": group[0]["target_ratio"],
            "variants": len(group),
        }
        for key in keys:
            values = [r[key] for r in group if r.get(key) is not None]
            summary[key] = sum(values) / len(values) if values else None
        gains = sorted(r["gain_kept"] for r in group if r.get("gain_kept") is not None)
        summary["gain_kept_median"] = statistics.median(gains) if gains else None
        summary["bit_exact"] = all(r["bit_exact"] for r in group)
        out.append(summary)
    return out


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def write_markdown(
    path: Path,
    command: str,
    rows: list[dict],
    summary: list[dict],
    fleet: list[dict],
    machine: str,
    seconds: float,
) -> None:
    lines = [
        "# Codecs side by side on the SmolLM2-135M fleet",
        "",
        f"Command: `{command}` ({seconds / 60:.0f} min on {machine}).",
        "",
        "Fleet: SmolLM2-135M-Instruct (bf16, dequantized from the Q4_1 GGUF) and its fine-tuned variants "
        "(`deltakit fleet build`). Metrics compare each reconstruction with the fine-tune on the variant's "
        "held-out domain text: KL(fine-tune ‖ reconstruction) in nats/token, KL closed = 1 − KL/KL(ft ‖ base), "
        "top-1 agreement with the fine-tune, gain kept = (ppl_base − ppl)/(ppl_base − ppl_ft); general ppl on "
        "`pydoc_data.topics` shows base retention. Ratio = coded bytes / fp16 bytes of the changed matrices; "
        "bits/weight counts the coded bytes over those matrices' weights. Times: seconds inside the command "
        "(process start excluded); peak RSS of the whole process (`/usr/bin/time -v`).",
        "",
        "| variant | steps | ppl base → ft (held-out) | KL(ft‖base) |",
        "| --- | ---: | --- | ---: |",
    ]
    seen = set()
    for row in rows:
        if row["variant"] in seen:
            continue
        seen.add(row["variant"])
        record = next(v for v in fleet if v["name"] == row["variant"])
        steps = record.get("recipe", {}).get("steps", record.get("steps", "?"))
        lines.append(
            f"| {row['variant']} | {steps} | {row['ppl_base']:.2f} → {row['ppl_finetune']:.2f} | "
            f"{row['kl_ft_base']:.4f} |"
        )
    lines += [
        "",
        "## Mean over the fleet",
        "",
        "Gain kept is shown as the median over variants: a variant whose fine-tune barely moved its held-out "
        "perplexity (Milton here) turns small differences into huge ratios, which swamp a mean. KL and top-1 "
        "are means.",
        "",
        "| codec | target | ratio | bits/w | gain kept (median) | KL | KL closed | top-1 | general ppl | "
        "weight err | compress s | apply s | peak MiB (c/a) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lines.append(
            f"| {s['codec']} | {s['target_ratio'] or 'exact'} | {fmt(s['ratio'], '.4f')} | "
            f"{fmt(s['bits_per_weight'], '.2f')} | {fmt(s['gain_kept_median'], '.3f')} | {fmt(s['kl'], '.4f')} | "
            f"{fmt(s['kl_closed'], '.3f')} | {fmt(s['top1'], '.4f')} | {fmt(s['general_ppl'], '.2f')} | "
            f"{fmt(s['weight_rel_error'], '.3f')} | {fmt(s['compress_s'], '.1f')} | {fmt(s['apply_s'], '.1f')} | "
            f"{fmt(s['compress_peak_rss_mib'], '.0f')}/{fmt(s['apply_peak_rss_mib'], '.0f')} |"
        )
    lines += [
        "",
        "## Per variant",
        "",
        "| variant | codec | target | ratio | gain kept | KL | KL closed | top-1 | domain ppl | general ppl |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['codec']} | {r['target_ratio'] or 'exact'} | {fmt(r['ratio'], '.4f')} | "
            f"{fmt(r['gain_kept'], '.3f')} | {fmt(r['kl'], '.4f')} | {fmt(r['kl_closed'], '.3f')} | "
            f"{fmt(r['top1'], '.4f')} | {fmt(r['domain_ppl'], '.2f')} | {fmt(r['general_ppl'], '.2f')} |"
        )
    lines += ["", "![rate-distortion](fleet_benchmark.png)", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, summary: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    codecs = list(dict.fromkeys(s["codec"] for s in summary))
    for index, codec in enumerate(codecs):
        marker, color = "osD^vP*X"[index % 8], f"C{index % 10}"  # same look for a codec in both panels
        points = sorted(
            (s["bits_per_weight"], s["gain_kept_median"], s["kl"])
            for s in summary
            if s["codec"] == codec and s["bits_per_weight"] is not None
        )
        if not points:
            continue
        xs = [p[0] for p in points]
        size = 10 if codec == "bitdelta" else 6  # bitdelta sits exactly under dqrelo@1/16 (same bytes)
        kwargs = dict(
            marker=marker, color=color, markersize=size, label=codec, fillstyle="none" if size > 6 else "full"
        )
        axes[0].plot(xs, [p[1] for p in points], **kwargs)
        if codec != "lossless":  # KL 0: off a log axis (it is exact)
            axes[1].plot(xs, [p[2] for p in points], **kwargs)
    axes[0].set_ylabel("gain kept (median over variants)")
    axes[0].axhline(1.0, color="grey", lw=0.6, ls="--")
    axes[0].axhline(0.0, color="grey", lw=0.6)
    axes[1].set_ylabel("KL(fine-tune ‖ recon), nats/token")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per weight of the changed matrices (log2)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M fleet: rate–distortion (lower KL is better; lossless has KL 0 at 5.4 bits)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_outputs(
    out: Path, command: str, rows: list[dict], fleet: list[dict], machine: str, seconds: float
) -> None:
    summary = summarise(rows)
    payload = {"command": command, "seconds": seconds, "machine": machine, "rows": rows, "summary": summary}
    (out / "fleet_benchmark.json").write_text(json.dumps(payload, indent=1))
    write_markdown(out / "fleet_benchmark.md", command, rows, summary, fleet, machine, seconds)
    plot(out / "fleet_benchmark.png", summary)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", help="comma-separated variant names (default: every built variant)")
    parser.add_argument(
        "--methods",
        help="comma-separated codecs (default: every data-free codec; '' for --extra settings only)",
    )
    parser.add_argument("--max-tokens", type=int, default=2048, help="tokens of each evaluation text")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--machine", default="a shared 2-core CPU machine (no GPU)")
    parser.add_argument("--render-only", action="store_true", help="redo the table and plot from the JSON")
    parser.add_argument("--bits-per-weight", help="comma-separated size targets, e.g. 2,1,0.5,0.25")
    parser.add_argument(
        "--factor-bits", help="comma-separated factor widths for low-rank codecs, e.g. 16,4,3"
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="one more setting as 'codec|label|compress arguments' (repeatable), e.g. "
        "'dqrelo|2bpw-uniform-none|--bits-per-weight 2 --set compensation=none'; {train} stands for the "
        "variant's training text (calibration data that never overlaps the held-out evaluation text)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the settings and exit")
    args = parser.parse_args()
    bits = [float(b) for b in args.bits_per_weight.split(",")] if args.bits_per_weight else None
    factor_bits = [int(b) for b in args.factor_bits.split(",")] if args.factor_bits else None
    if args.render_only:
        from deltakit.zoo.fleet import list_fleet

        saved = json.loads((args.out / "fleet_benchmark.json").read_text())
        write_outputs(
            args.out, saved["command"], saved["rows"], list_fleet(), saved["machine"], saved["seconds"]
        )
        return

    from deltakit import get_codec, list_codecs
    from deltakit.zoo.base import base_dir
    from deltakit.zoo.fleet import list_fleet

    methods = (
        [m for m in args.methods.split(",") if m]
        if args.methods is not None
        else [m for m in list_codecs() if not get_codec(m).needs_data]
    )
    settings = settings_for(methods, bits, factor_bits)
    for extra in args.extra:
        method, label, arguments = extra.split("|", 2)
        settings.append((method, label, arguments.split()))
    if args.dry_run:
        for method, label, extra in settings:
            print(method, label or "exact", " ".join(extra))
        return
    fleet = list_fleet()
    if args.variants:
        wanted = args.variants.split(",")
        by_name = {v["name"]: v for v in fleet}
        fleet = [by_name[name] for name in wanted if name in by_name]  # in the order given
    if not fleet:
        sys.exit("no fleet variants built: run `deltakit fleet build` first")
    command = "python benchmarks/fleet_codecs.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    rows: list[dict] = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deltakit-fleet-bench-") as tmp:
        for variant in fleet:
            print(f"{variant['name']}: {len(settings)} settings", file=sys.stderr, flush=True)
            rows += bench_variant(
                variant,
                base_dir(),
                settings,
                Path(tmp),
                args.max_tokens,
                lambda m: print(m, file=sys.stderr, flush=True),
            )
            for d in Path(tmp).glob("delta-*"):
                shutil.rmtree(d)
            # written after every variant so a long run leaves usable results at each step
            write_outputs(args.out, command, rows, fleet, args.machine, time.perf_counter() - started)
    print((args.out / "fleet_benchmark.md").read_text())


if __name__ == "__main__":
    main()
