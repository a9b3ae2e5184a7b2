"""Compress a fine-tune into a small delta and rebuild it, through the Python API.

Shows ``deltakit.compress`` (fine-tune + base -> delta directory), ``deltakit.load_delta`` (what the
manifest records), ``deltakit.apply`` (base + delta -> the fine-tune's tensors, here in memory) and a check
of the result: the rebuilt weights are much closer to the fine-tune than the base is.

    python examples/01_compress_apply.py --tiny                       # tiny local models, offline
    python examples/01_compress_apply.py --base BASE_DIR --finetune FT_DIR --method svd --ratio 0.125
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from _tiny import ensure_pair, pair_parser, parse_pair
from safetensors.torch import load_file

import deltakit


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over every 2-D tensor (fp64)."""
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in b if b[k].ndim == 2)
    den = sum(float(b[k].double().norm() ** 2) for k in b if b[k].ndim == 2)
    return (num / den) ** 0.5


def main() -> int:
    parser = pair_parser(__doc__.splitlines()[0])
    parser.add_argument("--method", default="svd")
    parser.add_argument("--ratio", type=float, default=0.25)
    args = parse_pair(parser)
    with tempfile.TemporaryDirectory(prefix="deltakit-example-") as tmp:
        return run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> int:
    """Compress, inspect, apply and check; ``work`` holds the delta (and the tiny models)."""
    ensure_pair(args, work)

    delta = deltakit.compress(args.base, args.finetune, work / "delta", method=args.method, ratio=args.ratio)
    manifest = deltakit.load_delta(work / "delta").manifest
    stats = manifest.stats
    print(f"delta: {manifest.codec.name}, {stats['stored_bytes']} bytes stored, "
          f"ratio {stats['ratio']:.3f} of the fp16 delta")  # fmt: skip

    report = deltakit.apply(args.base, delta, None)  # None: keep the rebuilt tensors in memory
    rebuilt, target, base = report.state_dict, load_state(args.finetune), load_state(args.base)
    gap_base, gap_rebuilt = relative_gap(base, target), relative_gap(rebuilt, target)
    print(f"relative distance to the fine-tune: base {gap_base:.5f}, base + delta {gap_rebuilt:.5f}")
    if not gap_rebuilt < gap_base:
        print("FAILED: the rebuilt model is not closer to the fine-tune than the base")
        return 1
    print(f"OK: base + delta recovers {100 * (1 - gap_rebuilt / gap_base):.1f}% of the distance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
