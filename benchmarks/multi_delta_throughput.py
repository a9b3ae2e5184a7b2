"""Tokens per second of one batch mixing 4 deltas (multi-delta path) against the same batch on the base.

Same fleet as ``swap_latency.py`` (built or reused under ``--work``). A batch of ``--batch`` rows (rows
spread evenly over 4 dqrelo deltas) decodes ``--steps`` tokens greedily with a KV cache, timed as:

- ``base``: the batch on the base weights alone (the ceiling);
- ``multi``: the batch with each row on its own delta (base matmul + per-group sign and low-rank parts),
  unpacked sign matrices cached across steps (``--sign-cache``), and ``multi_nocache`` (unpacked per step);
- ``sequential``: for each delta, swap it in and decode its rows alone (the merged fast path, one
  delta at a time).

Medians of ``--repeats`` interleaved runs; ratios are computed within each run, then the median taken.
Usage: python benchmarks/multi_delta_throughput.py [--batch 8] [--steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from swap_latency import build_fleet


@torch.no_grad()
def decode(model, ids: torch.Tensor, steps: int) -> int:
    """Greedy decode ``steps`` tokens for every row of ids (batch, prompt); returns tokens produced."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    for _ in range(steps - 1):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
    return ids.shape[0] * steps


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sign-cache", default=str(4 << 30), help="bytes for unpacked sign matrices")
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltakit-bench"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()

    from deltakit.runtime import HotSwapRuntime, MultiDeltaExecutor

    fleet = build_fleet(args.work, 4)
    names = [f"v{i}" for i in range(4)]
    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    for name, path in zip(names, fleet["delta"], strict=True):
        rt.add_delta(name, path)
    cached = MultiDeltaExecutor(rt, sign_cache_bytes=int(args.sign_cache))
    uncached = MultiDeltaExecutor(rt, sign_cache_bytes=0)
    assignment = [names[i % 4] for i in range(args.batch)]
    vocab = rt.model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.steps

    def run_base() -> None:
        rt.activate(None)
        decode(rt.model, ids, args.steps)

    def run_multi(executor) -> None:
        with executor.assign(assignment):
            decode(rt.model, ids, args.steps)

    def run_sequential() -> None:
        for name in names:
            rows = torch.tensor([i for i, a in enumerate(assignment) if a == name])
            rt.activate(name)
            decode(rt.model, ids[rows], args.steps)
        rt.activate(None)

    run_base()
    run_multi(cached)  # warm: fills the sign cache
    runs: dict[str, list[float]] = {"base": [], "multi": [], "multi_nocache": [], "sequential": []}
    ratios: dict[str, list[float]] = {
        "multi_over_base": [],
        "multi_nocache_over_base": [],
        "sequential_over_base": [],
    }
    for r in range(args.repeats):
        base_s = timed(run_base)
        multi_s = timed(lambda: run_multi(cached))
        nocache_s = timed(lambda: run_multi(uncached)) if r == 0 else None
        seq_s = timed(run_sequential)
        runs["base"].append(tokens / base_s)
        runs["multi"].append(tokens / multi_s)
        runs["sequential"].append(tokens / seq_s)
        ratios["multi_over_base"].append(base_s / multi_s)
        ratios["sequential_over_base"].append(base_s / seq_s)
        if nocache_s is not None:
            runs["multi_nocache"].append(tokens / nocache_s)
            ratios["multi_nocache_over_base"].append(base_s / nocache_s)
        print(
            f"run {r}: base {tokens / base_s:.1f} tok/s, multi {tokens / multi_s:.1f}, seq {tokens / seq_s:.1f}",
            flush=True,
        )
    result = {
        "fleet": fleet["kind"],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(next(rt.model.parameters()).dtype),
        "batch": args.batch,
        "deltas_in_batch": 4,
        "prompt_tokens": args.prompt,
        "decode_steps": args.steps,
        "sign_cache_bytes": cached.sign_cache.nbytes,
        "tokens_per_s_median": {k: statistics.median(v) for k, v in runs.items() if v},
        "throughput_ratio_median": {k: statistics.median(v) for k, v in ratios.items() if v},
        "repeats": args.repeats,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_delta_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
