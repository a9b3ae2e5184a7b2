"""Swap latency of the hot-swap runtime against reloading a fine-tuned checkpoint.

Fleet: the real SmolLM2-135M-Instruct base from the deltakit zoo cache when present (its real fine-tuned
variants when built, else synthetic fine-tunes of it), otherwise a random model of SmolLM2-135M's shape.
Each fine-tune is compressed with dqrelo (ratio 1/8). Reported, as medians of several runs:

- swap time per delta (host cache hit; cold: re-read from disk), and its bytes moved;
- (a) loading the fine-tuned checkpoint from disk (``from_pretrained``; and reading its safetensors
  into the resident model with ``copy_``, the cheapest full-checkpoint swap);
- (b) bytes moved / measured copy bandwidth (``copy_`` between two host buffers), a lower bound.

Usage: python benchmarks/swap_latency.py [--variants 4] [--repeats 5] [--out docs/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SMOL_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
)


def zoo_base() -> Path | None:
    try:
        from deltakit.zoo import zoo_dir

        base = zoo_dir() / "base"
    except Exception:
        return None
    return base if (base / "model.safetensors").exists() else None


def real_variants() -> list[Path]:
    try:
        from deltakit.zoo import list_fleet, variant_path

        return [
            variant_path(r["name"])
            for r in list_fleet()
            if (variant_path(r["name"]) / "config.json").exists()
        ]
    except Exception:
        return []


def random_base(out: Path) -> Path:
    """A random-init model of SmolLM2-135M's shape (bf16) with a byte tokenizer (no hub)."""
    import sys

    import transformers as tf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_runtime_support import byte_tokenizer

    if (out / "model.safetensors").exists():
        return out
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMOL_SHAPE)).to(torch.bfloat16)
    model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def synthetic_finetune(base: Path, out: Path, seed: int) -> Path:
    """Block linears move by (sign + rank-8) noise at 5% of mean|W|, norms slightly; embeddings untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers." not in name:
                continue
            if p.ndim == 2:
                rows, cols = p.shape
                low = (torch.randn(rows, 8, generator=g) @ torch.randn(8, cols, generator=g)) / 8**0.5
                signs = torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1
                p.add_((0.05 * p.float().abs().mean() * (signs + low)).to(p.dtype))
            else:
                p.add_((0.01 * torch.randn(p.shape, generator=g)).to(p.dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def build_fleet(work: Path, variants: int) -> dict:
    """{"base", "kind", "ft": [dirs], "delta": [dirs]}: deltas compressed with dqrelo at ratio 1/8."""
    import deltakit

    work.mkdir(parents=True, exist_ok=True)
    base = zoo_base()
    reals = real_variants() if base is not None else []
    if base is not None and len(reals) >= variants:
        kind, fts = "real SmolLM2-135M-Instruct base + real zoo fine-tunes", reals[:variants]
    elif base is not None:
        kind = "real SmolLM2-135M-Instruct base (zoo) + synthetic fine-tunes (sign + rank-8 noise on block linears)"
        fts = [synthetic_finetune(base, work / f"ft-{i}", 100 + i) for i in range(variants)]
    else:
        kind = "random-init model of SmolLM2-135M's shape + synthetic fine-tunes"
        base = random_base(work / "random-base")
        fts = [synthetic_finetune(base, work / f"ft-{i}", 100 + i) for i in range(variants)]
    deltas = []
    for i, ft in enumerate(fts):
        out = work / f"delta-{i}"
        if not (out / "manifest.json").exists():
            t = time.perf_counter()
            deltakit.compress(base, ft, out, method="dqrelo", ratio=1 / 8)
            print(f"compressed {ft.name} in {time.perf_counter() - t:.1f}s", flush=True)
        deltas.append(out)
    return {"base": base, "kind": kind, "ft": fts, "delta": deltas}


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Median bytes/s of ``dst.copy_(src)`` between two host buffers."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def load_state_into(model, ft_dir: Path) -> None:
    """Read a fine-tuned checkpoint's safetensors and copy every tensor into ``model`` in place."""
    from safetensors.torch import load_file

    params = model.state_dict()
    with torch.no_grad():
        for file in sorted(ft_dir.glob("*.safetensors")):
            for name, tensor in load_file(file).items():
                params[name].copy_(tensor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltakit-bench"))
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from transformers import AutoModelForCausalLM

    from deltakit.runtime import HotSwapRuntime

    fleet = build_fleet(args.work, args.variants)
    names = [f"v{i}" for i in range(len(fleet["delta"]))]
    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    for name, path in zip(names, fleet["delta"], strict=True):
        rt.add_delta(name, path)
    cold = HotSwapRuntime(rt.resident, host_cache_bytes=0, device_cache_bytes=0)
    for name, path in zip(names, fleet["delta"], strict=True):
        cold.add_delta(name, path, eager=False)  # nothing cached: every swap re-reads the delta from disk

    warm, cold_stats = [], []
    for _ in range(args.repeats):
        for name in names:  # v0 -> v1 -> v2 -> v3 -> v0 ... (each swap restores the previous delta's tensors)
            warm.append(rt.activate(name))
    rt.activate(None)
    for _ in range(max(2, args.repeats // 2)):
        for name in names:
            cold_stats.append(cold.activate(name))
    cold.activate(None)

    load_times, copy_times = [], []
    for i in range(args.repeats):
        ft = fleet["ft"][i % len(fleet["ft"])]
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(ft, dtype="auto")
        load_times.append(time.perf_counter() - t)
        del model
        t = time.perf_counter()
        load_state_into(rt.model, ft)
        copy_times.append(time.perf_counter() - t)
    # the resident model now holds a fine-tune's raw weights: restore the base (the runtime does not know)
    with torch.no_grad():
        for canonical in list(rt.resident._pristine):
            rt.resident.param(canonical).data.copy_(rt.resident.pristine(canonical))

    bandwidth = copy_bandwidth()
    swap_s = statistics.median(s.seconds for s in warm)
    moved = statistics.median(s.bytes_moved for s in warm)
    delta_bytes = statistics.median(rt.host_cache.get(n).stored_nbytes for n in names)
    model_bytes = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    result = {
        "fleet": fleet["kind"],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "model_bytes": model_bytes,
        "delta_bytes_compressed": delta_bytes,
        "swap_warm_s_median": swap_s,
        "swap_warm_apply_s_median": statistics.median(s.apply_seconds for s in warm),
        "swap_cold_s_median": statistics.median(s.seconds for s in cold_stats),
        "swap_bytes_moved_median": moved,
        "tensors_per_swap": statistics.median(s.tensors for s in warm),
        "copy_bandwidth_Bps": bandwidth,
        "swap_lower_bound_s": moved / bandwidth,
        "load_from_pretrained_s_median": statistics.median(load_times),
        "load_safetensors_copy_in_place_s_median": statistics.median(copy_times),
        "ratio_from_pretrained_over_swap": statistics.median(load_times) / swap_s,
        "ratio_copy_in_place_over_swap": statistics.median(copy_times) / swap_s,
        "ratio_swap_over_bandwidth_bound": swap_s / (moved / bandwidth),
        "runs": {"warm_swaps": len(warm), "cold_swaps": len(cold_stats), "loads": len(load_times)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "swap_latency.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
