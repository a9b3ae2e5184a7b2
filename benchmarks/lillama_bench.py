"""Benchmark: lillama vs plain truncated SVD at the same parameter count, joint vs teacher-input loss.

Model mode: the fleet base (SmolLM2-135M-Instruct) at −``reduction`` parameters; held-out perplexity on the
last 20% of the general text (pydoc topics; the first 80% is the calibration text). Baseline: the same
ranks without distillation (``--set distill=false``: the SVD initialisation).
Delta mode: fleet variants at ``--ratio``; ``svd`` vs ``lillama`` (joint, teacher-input); KL(ft ‖ recon),
KL closed, perplexity gain kept on the variant's held-out text; calibration = the variant's training text.

Writes docs/lillama_results.md and docs/lillama_results.json. Run from the repository root:

    python benchmarks/lillama_bench.py --tokens 8192 --delta-tokens 4096
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import deltakit
from deltakit.eval.lm import compare_models, perplexity, tokenize
from deltakit.eval.metrics import gain_kept, kl_closed
from deltakit.eval.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_mode(args: argparse.Namespace, base: Path, work: Path) -> dict[str, Any]:
    from deltakit.zoo.corpora import general_text

    text = general_text()
    cut = int(len(text) * 0.8)
    cal = work / "general_cal.txt"
    cal.write_text(text[:cut], encoding="utf-8")
    tokenizer = load_tokenizer(base)
    held = tokenize(tokenizer, text[cut:], args.eval_tokens)
    out: dict[str, Any] = {"eval_tokens": len(held), "runs": {}}
    t0 = time.perf_counter()
    out["ppl_original"] = perplexity(load_model(base), held, args.eval_window)
    log(f"original ppl {out['ppl_original']:.3f} ({time.perf_counter() - t0:.0f}s)")
    runs = {
        "svd (no distillation)": {"distill": "false"},
        "lillama joint": {"loss": "joint"},
        "lillama teacher-input": {"loss": "teacher"},
    }
    for label, sets in runs.items():
        if label not in args.model_runs:
            continue
        sets = {"lr": str(args.lr), "strategy": args.strategy, "rank_step": str(args.rank_step), **sets}
        t0 = time.perf_counter()
        out_dir = work / label.replace(" ", "-").replace("(", "").replace(")", "")
        report = deltakit.compress_model(
            base,
            out_dir,
            method="lillama",
            data=[cal],
            tokens=args.tokens,
            seq_len=args.seq_len,
            reduction=args.reduction,
            overrides=sets,
            overwrite=True,
        )
        seconds = time.perf_counter() - t0
        model = deltakit.load_model(out_dir).float()
        ppl = perplexity(model, held, args.eval_window)
        blocks = report.get("blocks", [])
        out["runs"][label] = {
            "set": sets,
            "ppl": ppl,
            "seconds": round(seconds, 1),
            "params_before": report["params_before"],
            "params_after": report["params_after"],
            "reduction": report["reduction"],
            "calibration_tokens": report["calibration_tokens"],
            "block_loss_before": [round(b["before"]["student_input"], 4) for b in blocks],
            "block_loss_after": [round(b["after"]["student_input"], 4) for b in blocks],
        }
        log(f"{label}: ppl {ppl:.3f}, {report['reduction']:.3%} params removed, {seconds:.0f}s")
        del model
    return out


def delta_mode(args: argparse.Namespace, base: Path, work: Path) -> dict[str, Any]:
    from deltakit.eval.models import reconstruct
    from deltakit.zoo.fleet import list_fleet

    fleet = [v for v in list_fleet() if not args.variants or v["name"] in args.variants][: args.max_variants]
    if not fleet:
        return {"skipped": "no fleet variant built (deltakit fleet build)"}
    tokenizer = load_tokenizer(base)
    base_model = load_model(base)
    results: dict[str, Any] = {}
    for record in fleet:
        name, ft_dir = record["name"], Path(record["path"])
        held = tokenize(tokenizer, Path(record["heldout_path"]).read_text(encoding="utf-8"), args.eval_tokens)
        runs = {"svd": ("svd", {})}
        for loss in args.delta_losses:
            runs[f"lillama {loss}"] = ("lillama", {"loss": loss, "lr": str(args.delta_lr)})
        candidates, info = {"base": base_model}, {}
        for label, (method, sets) in runs.items():
            t0 = time.perf_counter()
            delta_dir = work / f"{name}-{label.replace(' ', '-')}"
            kwargs = (
                {"data": [record["train_path"]], "tokens": args.delta_tokens, "seq_len": args.seq_len}
                if method == "lillama"
                else {}
            )
            delta = deltakit.compress(
                base,
                ft_dir,
                delta_dir,
                method=method,
                ratio=args.ratio,
                overrides=sets,
                overwrite=True,
                **kwargs,
            )
            seconds = time.perf_counter() - t0
            recon = reconstruct(base, delta_dir, work / f"{name}-{label.replace(' ', '-')}-model")
            candidates[label] = load_model(recon)
            info[label] = {
                "seconds": round(seconds, 1),
                "stored_bytes": delta.manifest.stats["stored_bytes"],
                "ratio": delta.manifest.stats["ratio"],
                "set": sets,
            }
            log(f"{name} {label}: {seconds:.0f}s")
        cmp = compare_models(load_model(ft_dir), candidates, held, args.eval_window)
        kl_base = cmp.candidates["base"].kl
        ppl_base = cmp.candidates["base"].ppl
        rows = {}
        for label, c in cmp.candidates.items():
            rows[label] = {
                "kl": c.kl,
                "top1": c.top1,
                "ppl": c.ppl,
                "kl_closed": kl_closed(c.kl, kl_base),
                "gain_kept": gain_kept(ppl_base, c.ppl, cmp.reference_ppl),
                **info.get(label, {}),
            }
        results[name] = {"ppl_finetune": cmp.reference_ppl, "eval_tokens": cmp.tokens, "rows": rows}
        del candidates
    return results


def write_report(results: dict[str, Any], path: Path) -> None:
    lines = [
        "# lillama: measured results",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']}; total time {results['seconds']:.0f} s "
        f"(CPU shared with other jobs: timings are wall clock under contention).",
        "",
    ]
    for earlier in results.get("earlier", []):
        lines += [f"The {earlier['section']} section comes from an earlier run: `{earlier['command']}`.", ""]
    m = results.get("model")
    if m:
        a = results.get("model_args") or results["args"]  # a merged section keeps its own run's settings
        lines += [
            "## Model mode: SmolLM2-135M-Instruct at −{:.0%} parameters".format(a["reduction"]),
            "",
            f"Calibration: {a['tokens']} tokens requested (seq {a['seq_len']}) from the first 80% of the "
            f"general text; held-out perplexity on {m['eval_tokens']} tokens of the last 20% "
            f"(window {a['eval_window']}). Strategy `{a['strategy']}`, rank step {a['rank_step']}, "
            f"lr {a['lr']}.",
            "",
            f"Original model perplexity: **{m['ppl_original']:.3f}**",
            "",
            "| run | params after | removed | held-out ppl | time (s) |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, r in m["runs"].items():
            lines.append(
                f"| {label} | {r['params_after']:,} | {r['reduction']:.2%} | {r['ppl']:.3f} | {r['seconds']} |"
            )
        for label, r in m["runs"].items():
            if r["block_loss_before"]:
                lines += [
                    "",
                    f"{label}: block loss (student input, first eval windows) before → after: "
                    + ", ".join(
                        f"{b:.3f}→{c:.3f}"
                        for b, c in zip(r["block_loss_before"], r["block_loss_after"], strict=True)
                    ),
                ]
        lines.append("")
    d = results.get("delta")
    if d:
        a = results.get("delta_args") or results["args"]
        lines += [f"## Delta mode: fleet variants at ratio {a['ratio']:.4g} of the fp16 delta", ""]
        if "skipped" in d:
            lines += [f"Skipped: {d['skipped']}", ""]
        for name, v in d.items():
            if name == "skipped":
                continue
            lines += [
                f"### {name}",
                "",
                f"Fine-tune held-out ppl {v['ppl_finetune']:.3f} on {v['eval_tokens']} "
                f"tokens; lillama calibration {a['delta_tokens']} tokens of the variant's training text, "
                f"lr {a['delta_lr']}.",
                "",
                "| candidate | KL(ft‖·) nats/token | KL closed | ppl | gain kept | top-1 agree | time (s) |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for label, r in v["rows"].items():
                lines.append(
                    f"| {label} | {r['kl']:.4f} | {r['kl_closed']:.3f} | {r['ppl']:.3f} | "
                    f"{r['gain_kept']:.3f} | {r['top1']:.3f} | {r.get('seconds', '')} |"
                )
            lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="model-mode calibration tokens")
    p.add_argument("--delta-tokens", type=int, default=4096, help="delta-mode calibration tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--reduction", type=float, default=0.2)
    p.add_argument("--ratio", type=float, default=1 / 16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--delta-lr", type=float, default=1e-4)
    p.add_argument("--strategy", default="bottom")
    p.add_argument("--rank-step", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--eval-window", type=int, default=256)
    p.add_argument(
        "--model-runs", nargs="*", default=["svd (no distillation)", "lillama joint", "lillama teacher-input"]
    )
    p.add_argument("--delta-losses", nargs="*", default=["joint"])
    p.add_argument("--variants", nargs="*", default=[])
    p.add_argument("--max-variants", type=int, default=1)
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-delta", action="store_true")
    p.add_argument("--merge", action="store_true", help="keep the sections this run skips from --out's JSON")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "lillama_results.md")
    args = p.parse_args()
    torch.manual_seed(0)
    from deltakit.zoo.base import ensure_base

    base = ensure_base(install=False)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python "
        + " ".join(shlex.quote(a) for a in ["benchmarks/lillama_bench.py", *sys.argv[1:]]),
        "machine": f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="lillama-bench-") as tmp:
        work = Path(tmp)
        if not args.skip_model:
            results["model"] = model_mode(args, base, work)
        if not args.skip_delta:
            results["delta"] = delta_mode(args, base, work)
    results["seconds"] = time.perf_counter() - started
    previous = args.out.with_suffix(".json")
    if args.merge and previous.is_file():  # keep the section(s) this run skipped, with their command
        prior = json.loads(previous.read_text(encoding="utf-8"))
        for section in ("model", "delta"):
            if section not in results and section in prior:
                results[section] = prior[section]
                results[f"{section}_args"] = prior.get(f"{section}_args", prior.get("args"))
                results.setdefault("earlier", []).append(
                    {"section": section, "command": prior.get("command"), "seconds": prior.get("seconds")}
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(results, indent=1, default=str) + "\n", encoding="utf-8"
    )
    write_report(results, args.out)
    log(f"wrote {args.out} ({results['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
