"""DeltaLLM on the fleet's base (SmolLM2-135M) at ~12% fewer parameters, against baselines at equal size.

Runs, all from the same base and the same calibration text:
  deltallm (PMR)        deltas distilled with Progressive Module Replacement
  deltallm (plain KD)   deltas distilled with p = 1 throughout (plain distillation)
  deltallm (untrained)  deltas = truncated SVD of W_follower − W_anchor, no training
  block drop            ShortGPT: the least influential whole blocks removed (count nearest the same reduction)
  svd                   the same follower matrices replaced by their own rank-r SVD (exactly the same size)
and measures held-out perplexity and KL(original ‖ candidate) per token, writing
docs/deltallm_results.{json,md} and docs/deltallm_curves.png (PMR vs plain distillation loss curves).

    python benchmarks/deltallm_bench.py --steps 16 --batch-size 2 --seq-len 128 --heldout-tokens 2048
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

import deltakit
from deltakit.deltallm import count_parameters
from deltakit.deltallm.baselines import (
    block_influence,
    blocks_to_drop,
    drop_blocks_,
    drop_count_for,
    svd_baseline_,
    svd_modules,
)
from deltakit.deltallm.compress import model_layout
from deltakit.deltallm.io import read_meta
from deltakit.deltallm.plan import SharingPlan
from deltakit.distill.data import calibration_batches
from deltakit.eval.lm import compare_models, tokenize
from deltakit.models.checkpoint import CheckpointReader

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_model_dir(given: str | None) -> Path:
    if given:
        return Path(given)
    from deltakit.zoo.base import ensure_base

    return ensure_base()


def data_files(work: Path, seed: int) -> tuple[Path, Path]:
    """General English text (Python's pydoc topics) split into calibration and held-out parts (disjoint)."""
    from deltakit.zoo.corpora import general_text, split_documents

    split = split_documents([general_text()], heldout_fraction=0.1, max_heldout_chars=40_000, seed=seed)
    train, heldout = work / "train.txt", work / "heldout.txt"
    train.write_text(split.train)
    heldout.write_text(split.heldout)
    return train, heldout


def progress_printer(label: str):
    last = [0.0]

    def progress(done: int, total: int, name: str) -> None:
        if time.time() - last[0] > 20 or done == total:
            last[0] = time.time()
            log(f"{label}: {done}/{total} {name}")

    return progress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base checkpoint dir (default: deltakit.zoo.base.ensure_base())")
    ap.add_argument("--work", default="/tmp/deltallm_bench", help="scratch dir for the compressed models")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where results go")
    ap.add_argument("--reduction", type=float, default=0.12)
    ap.add_argument("--layout", default="alternating")
    ap.add_argument("--share", default="mlp")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--bi-windows", type=int, default=4, help="calibration windows for block influence")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    began = time.time()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = base_model_dir(args.model)
    train_txt, heldout_txt = data_files(work, args.seed)
    probe = 1
    tokens = (args.steps * args.batch_size + probe) * args.seq_len
    common = {
        "layout": args.layout,
        "share": args.share,
        "batch_size": str(args.batch_size),
        "lr": str(args.lr),
        "steps": str(args.steps),
        "eval_every": str(args.eval_every),
        "probe_windows": str(probe),
    }
    runs = {
        "deltallm_pmr": {**common, "pmr": "true"},
        "deltallm_plain": {**common, "pmr": "false"},
        "deltallm_untrained": {**common, "train": "false"},
    }
    reports = {}
    for name, sets in runs.items():
        log(f"compressing {name} ({sets})")
        reports[name] = deltakit.compress_model(
            model_dir,
            work / name,
            method="deltallm",
            data=[train_txt],
            tokens=tokens,
            seq_len=args.seq_len,
            reduction=args.reduction,
            overrides=sets,
            seed=args.seed,
            overwrite=True,
            progress=progress_printer(name),
        )
        log(f"{name}: {reports[name]['seconds']} s")

    import transformers as tf

    plan = SharingPlan.from_dict(read_meta(work / "deltallm_pmr")["plan"])
    layout = model_layout(CheckpointReader(model_dir))
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    teacher = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = count_parameters(teacher)
    candidates = {name: deltakit.load_model(work / name) for name in runs}

    log("block influence")
    windows = calibration_batches(
        [train_txt],
        tokenizer,
        seq_len=args.seq_len,
        tokens=args.bi_windows * args.seq_len,
        seed=args.seed + 1,
    )
    drop_model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    influence = block_influence(drop_model, windows, batch_size=2)
    n_drop = drop_count_for(plan.removed_params(), layout.layer_params)
    dropped = blocks_to_drop(influence, n_drop, keep_first=plan.keep_first, keep_last=plan.keep_last)
    drop_blocks_(drop_model, dropped)
    candidates["block_drop"] = drop_model
    svd_model = tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    svd_baseline_(svd_model, svd_modules(plan), plan.rank, seed=args.seed)
    candidates["svd"] = svd_model

    log(f"evaluating {len(candidates)} candidates on {args.heldout_tokens} held-out tokens")
    ids = tokenize(tokenizer, heldout_txt.read_text(), max_tokens=args.heldout_tokens)
    result = compare_models(
        teacher, candidates, ids, window=args.window, progress=lambda d, t: log(f"eval window {d}/{t}")
    )
    rows = {}
    for name, comp in result.candidates.items():
        params = count_parameters(candidates[name])
        rows[name] = {
            "params": params,
            "reduction": round(1 - params / total, 4),
            "ppl": round(comp.ppl, 3),
            "kl": round(comp.kl, 4),
            "top1": round(comp.top1, 4),
        }
    curves = {}
    for name in ("deltallm_pmr", "deltallm_plain"):
        curves[name] = json.loads((work / name / "training.json").read_text())
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:])
    results = {
        "command": command,
        "model": str(model_dir),
        "original_params": total,
        "original_ppl": round(result.reference_ppl, 3),
        "heldout_tokens_scored": result.tokens,
        "plan": {
            "layout": plan.layout,
            "share": plan.share,
            "rank": plan.rank,
            "followers": plan.followers,
            "anchors": plan.anchors,
        },
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "tokens_per_run": args.steps * args.batch_size * args.seq_len,
            "seconds": {n: reports[n]["training"]["seconds"] for n in ("deltallm_pmr", "deltallm_plain")},
        },
        "block_drop": {"influence": [round(x, 4) for x in influence], "dropped": dropped},
        "rows": rows,
        "curves": {n: {"steps": c["steps"], "probe": c["probe"]} for n, c in curves.items()},
        "threads": args.threads,
        "wall_seconds": round(time.time() - began, 1),
    }
    (out / "deltallm_results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(curves, out / "deltallm_curves.png")
    write_markdown(results, out / "deltallm_results.md")
    log(f"done in {results['wall_seconds']} s")
    for name, row in rows.items():
        log(f"{name:20s} {row}")


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"deltallm_pmr": "PMR", "deltallm_plain": "plain distillation"}
    for name, c in curves.items():
        left.plot(
            [s["step"] for s in c["steps"]], [s["kl"] for s in c["steps"]], marker=".", label=labels[name]
        )
        right.plot(
            [p["step"] for p in c["probe"]], [p["kl"] for p in c["probe"]], marker="o", label=labels[name]
        )
    left.set(
        title="training loss (KL to original, student as sampled)", xlabel="step", ylabel="KL (nats/token)"
    )
    right.set(title="fully compressed student, held-out probe", xlabel="step", ylabel="KL (nats/token)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_markdown(r: dict, path: Path) -> None:
    names = {
        "deltallm_pmr": "DeltaLLM, PMR-trained",
        "deltallm_plain": "DeltaLLM, plain-KD-trained",
        "deltallm_untrained": "DeltaLLM, untrained (SVD init)",
        "block_drop": "block drop (ShortGPT BI)",
        "svd": "plain SVD of the same matrices",
    }
    t = r["training"]
    lines = [
        "# DeltaLLM on SmolLM2-135M: results",
        "",
        f"Command: `{r['command']}` (wall {r['wall_seconds'] / 60:.1f} min on {r['threads']} shared CPU threads).",
        "",
        f"Plan: layout {r['plan']['layout']}, share {r['plan']['share']}, rank {r['plan']['rank']}, anchors "
        f"{r['plan']['anchors']}, followers {r['plan']['followers']}.",
        f"Training budget per run: {t['steps']} steps × {t['batch_size']} windows × {t['seq_len']} tokens = "
        f"**{t['tokens_per_run']} tokens** (the paper uses 30–40M), lr {t['lr']}; training seconds {t['seconds']} "
        "(wall clock on a CPU shared with other jobs: not a speed comparison between the two).",
        f"Held-out: {r['heldout_tokens_scored']} tokens of general English text disjoint from the calibration text; "
        f"original model perplexity {r['original_ppl']}.",
        "",
        "| model | params | removed | held-out ppl | KL to original (nats/tok) | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
        f"| original | {r['original_params']:,} | 0 | {r['original_ppl']} | 0 | 1 |",
    ]
    for key, row in r["rows"].items():
        lines.append(
            f"| {names.get(key, key)} | {row['params']:,} | {row['reduction']:.1%} | {row['ppl']} | "
            f"{row['kl']} | {row['top1']} |"
        )
    lines += [
        "",
        f"Block drop removed blocks {r['block_drop']['dropped']} (whole blocks: the count nearest the same "
        "reduction, so its size differs slightly).",
        "",
        "![PMR vs plain distillation](deltallm_curves.png)",
        "",
        "Curves: left, the per-step training KL (for PMR, the student is a random mix of original and compressed "
        "blocks, so early values are not comparable); right, the KL of the *fully compressed* student on a "
        "held-out probe window every few steps (comparable). Data: `deltallm_results.json`.",
    ]
    for name, c in r["curves"].items():
        if c["probe"]:
            probe = ", ".join(f"{p['step']}: {p['kl']:.3f}" for p in c["probe"])
            lines.append(f"- {names[name]} probe KL by step: {probe}")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
