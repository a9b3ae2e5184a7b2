"""Issue 13's speed targets, measured side by side in one run; writes docs/speed.md and docs/speed.json.

Fleet: the real SmolLM2-135M-Instruct base and its zoo variants (shakespeare, milton, fortunes-computers,
jargon; build them first with ``deltakit fleet build``, cached under ``$DELTAKIT_CACHE``), or with
``--tiny`` a tiny local Llama and synthetic fine-tunes (a smoke test in seconds; its figures mean little).
Each fine-tune is compressed with dqrelo 1/8 (sign + low-rank) and svd 1/8 (low-rank only).

Measured (medians of ``--repeats``):
1. warm hot swap (compressed delta in host memory) vs its copy bound (bytes moved / measured memcpy
   bandwidth) vs ``from_pretrained`` of the fine-tune from a cold page cache (a fresh copy of its
   files, dropped from the cache with fsync + posix_fadvise(DONTNEED)); on CUDA also vs the
   host->device bound (pinned copy bandwidth);
2. a batch mixing 4 deltas x 2 rows vs the base alone, tokens/s (dqrelo and svd deltas), with the
   mixed path's cost split (sign part, low-rank part, other hooks; base = the rest);
3. ``deltakit.apply`` and data-free ``deltakit.compress`` vs ``from_pretrained`` + ``save_pretrained``
   of the same checkpoint;
4. ``deltakit compress`` (the command, default threads) idle vs with a CPU-bound busy loop running.

Usage: python benchmarks/speed.py [--tiny] [--repeats 5] [--work /tmp/deltakit-speed] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("shakespeare", "milton", "fortunes-computers", "jargon")
TINY_SHAPE = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- fleet ------------------------------------------------------------------------------------------
def tiny_fleet(work: Path) -> tuple[Path, list[Path], str]:
    """A tiny bf16 Llama and 4 synthetic fine-tunes of it (sign + rank-8 noise), built locally."""
    import transformers as tf

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from swap_latency import synthetic_finetune
    from test_runtime_support import byte_tokenizer

    base = work / "tiny-base"
    if not (base / "model.safetensors").exists():
        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_SHAPE)).to(torch.bfloat16).save_pretrained(base)
        byte_tokenizer().save_pretrained(base)
    fts = [synthetic_finetune(base, work / f"tiny-ft-{i}", 100 + i) for i in range(4)]
    return base, fts, "tiny local Llama (hidden 128, 4 layers, bf16) + synthetic fine-tunes"


def real_fleet() -> tuple[Path, list[Path], str]:
    from deltakit.zoo import variant_path, zoo_dir

    base = zoo_dir() / "base"
    fts = [variant_path(v) for v in VARIANTS]
    missing = [str(p) for p in [base, *fts] if not (p / "config.json").exists()]
    if missing:
        sys.exit(
            f"error: the SmolLM2 fleet is not built ({missing[0]} is missing): run `deltakit fleet build`"
        )
    return base, fts, "real SmolLM2-135M-Instruct base + zoo fine-tunes " + ", ".join(VARIANTS)


#: codec config of every delta measured here (``--factor-bits``): the factor width sets the rank at 1/8
CONFIG: dict[str, int] = {"factor_bits": 16}


def compress_all(base: Path, fts: list[Path], work: Path, method: str) -> list[Path]:
    import deltakit

    out = []
    for ft in fts:
        target = work / f"delta-{method}-f{CONFIG['factor_bits']}-{ft.name}"
        if not (target / "manifest.json").exists():
            deltakit.compress(base, ft, target, method=method, ratio=1 / 8, config=CONFIG, overwrite=True)
        out.append(target)
    return out


def cpu_name() -> str:
    """The CPU's model name (figures differ between CPU models), or the architecture where none is found."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


# -- 1. swaps -------------------------------------------------------------------------------------
def copy_bandwidth(nbytes: int, repeats: int = 5, pinned_to: str | None = None) -> float:
    """Median bytes/s of ``copy_`` between two host buffers (or pinned host -> ``pinned_to``)."""
    src = torch.empty(nbytes, dtype=torch.uint8).random_()
    if pinned_to is not None:
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=pinned_to or "cpu")

    def run() -> None:
        dst.copy_(src, non_blocking=pinned_to is not None)
        if pinned_to is not None:
            torch.cuda.synchronize()

    run()
    return nbytes / median_time(run, repeats)


def cold_copy(src: Path, dst: Path) -> Path:
    """A fresh copy of checkpoint ``src``, written out and dropped from the page cache."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    for file in dst.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return dst


def bench_swaps(
    base: Path, fts: list[Path], deltas: list[Path], work: Path, repeats: int, device: str
) -> dict:
    from transformers import AutoModelForCausalLM

    from deltakit.runtime import HotSwapRuntime

    rt = HotSwapRuntime.from_pretrained(base, device=device)
    names = [f"v{i}" for i in range(len(deltas))]
    for name, path in zip(names, deltas, strict=True):
        rt.add_delta(name, path)
    for name in names:
        rt.activate(name)  # warm-up: caches filled
    warm = [rt.activate(names[i % len(names)]) for i in range(repeats * len(names))]
    rt.activate(None)
    compressed = statistics.median(rt.host_cache.get(n).stored_nbytes for n in names)
    # a swap reads the pristine base and the compressed delta and writes the parameters: at best one copy
    # of the pristine bytes plus a read of the compressed ones
    moved = statistics.median(s.restored_bytes for s in warm) + compressed
    swap_s = statistics.median(s.seconds for s in warm)
    bandwidth = copy_bandwidth(max(64 << 20, int(moved)))
    cold = []
    for i in range(repeats):
        fresh = cold_copy(fts[i % len(fts)], work / "cold-ft")
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(fresh, dtype="auto")
        cold.append(time.perf_counter() - t)
        del model
    floor = low_rank_floor(deltas[0], device, repeats)
    result = {
        "device": device,
        "swap_warm_s": swap_s,
        "low_rank_macs": floor["macs"],
        "low_rank_product_s": floor["seconds"],
        "ratio_swap_over_low_rank_product": swap_s / floor["seconds"] if floor["seconds"] else None,
        "swap_bytes_moved": moved,
        "tensors_per_swap": statistics.median(s.tensors for s in warm),
        "memcpy_Bps": bandwidth,
        "copy_bound_s": moved / bandwidth,
        "from_pretrained_cold_s": statistics.median(cold),
        "ratio_swap_over_copy_bound": swap_s / (moved / bandwidth),
        "ratio_from_pretrained_cold_over_swap": statistics.median(cold) / swap_s,
    }
    if device == "cuda":
        h2d = copy_bandwidth(max(64 << 20, int(moved)), pinned_to="cuda")
        restored = statistics.median(s.restored_bytes for s in warm)
        result |= {
            "h2d_Bps": h2d,
            "h2d_bound_s": restored / h2d,
            "ratio_swap_over_h2d_bound": swap_s / (restored / h2d),
        }
    return result


def low_rank_floor(delta_path: Path, device: str, repeats: int) -> dict:
    """Seconds of the fp32 products ``up @ down`` alone (the BLAS, into preallocated outputs), over every
    factored tensor of one delta.

    Any decode that forms the low-rank part in fp32 does this arithmetic (rank·rows·cols multiply-adds
    per matrix); with 4-bit factors the rank, and so this floor, is about 4x that of fp16 factors.
    """
    from deltakit.core.decode import Decoder
    from deltakit.core.rebuild import factored_view
    from deltakit.format.delta import load_delta

    decoder = Decoder.of(load_delta(delta_path))
    pairs = []
    for name, entry in decoder.delta.manifest.tensors.items():
        if entry.kind != "encoded":
            continue
        view = factored_view(decoder.codec, decoder.encoded(name))
        if view is not None and view.up is not None:
            pairs.append((view.up.float().to(device), view.down.float().to(device)))  # (rows, r), (r, cols)
    macs = sum(up.shape[0] * up.shape[1] * down.shape[1] for up, down in pairs)
    # into outputs allocated once: fresh outputs would add page faults or not, as the allocator decides
    outs = [torch.empty(up.shape[0], down.shape[1], device=device) for up, down in pairs]

    def once() -> float:
        t = time.perf_counter()
        for (up, down), out in zip(pairs, outs, strict=True):
            torch.matmul(up, down, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    once()
    return {"macs": macs, "seconds": statistics.median(once() for _ in range(max(3, repeats)))}


# -- 2. mixed batches ------------------------------------------------------------------------------
@torch.no_grad()
def decode(model, ids: torch.Tensor, steps: int) -> None:
    """Greedy decode ``steps`` tokens for every row of ids (batch, prompt)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    for _ in range(steps - 1):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (batch, 1)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)


def bench_mixed(base: Path, deltas: list[Path], repeats: int, device: str, prompt: int, steps: int) -> dict:
    from deltakit.runtime import HotSwapRuntime, MultiDeltaExecutor

    rt = HotSwapRuntime.from_pretrained(base, device=device)
    names = [f"v{i}" for i in range(4)]
    for name, path in zip(names, deltas, strict=True):
        rt.add_delta(name, path)
    assignment = [n for n in names for _ in range(2)]  # 4 deltas x 2 rows
    ids = torch.randint(
        0, rt.model.config.vocab_size, (8, prompt), generator=torch.Generator().manual_seed(0)
    )
    ids = ids.to(device)
    executor = MultiDeltaExecutor(rt, sign_cache_bytes=4 << 30)
    profiled = MultiDeltaExecutor(rt, sign_cache_bytes=4 << 30, profile=True)

    def base_run() -> None:
        rt.activate(None)
        decode(rt.model, ids, steps)

    def mixed(ex) -> None:
        with ex.assign(assignment):
            decode(rt.model, ids, steps)

    base_run()
    mixed(executor)  # warm: sign cache filled
    base_s, mixed_s = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine
        base_s.append(median_time(base_run, 1))
        mixed_s.append(median_time(lambda: mixed(executor), 1))
    mixed(profiled)
    profiled.reset_costs()
    total = median_time(lambda: mixed(profiled), 1)
    costs = dict(profiled.costs)
    tokens = 8 * steps
    return {
        "tokens_per_s_base": tokens / statistics.median(base_s),
        "tokens_per_s_mixed": tokens / statistics.median(mixed_s),
        "ratio_mixed_over_base": statistics.median(base_s) / statistics.median(mixed_s),
        "cost_split_one_profiled_run_s": {
            "total": total,
            "base_and_rest": total - costs["hooks_s"],
            "sign": costs["sign_s"],
            "low_rank": costs["low_rank_s"],
            "dense_rerun": costs["dense_s"],
            "other_hook_work": costs["hooks_s"] - costs["sign_s"] - costs["low_rank_s"] - costs["dense_s"],
        },
    }


# -- 3./4. apply, compress, load+save -------------------------------------------------------------
def bench_apply_compress(base: Path, ft: Path, delta: Path, work: Path, repeats: int) -> dict:
    """apply and compress against load+save, interleaved. Each runs twice per repeat: with the checkpoints'
    tensor digests remembered (``digest cache``, as for a base that serves many deltas) and with the cache
    switched off (every tensor hashed, as for a checkpoint seen for the first time). Compress also runs on
    a fresh copy of the fine-tune (copied untimed): a new fine-tune against a remembered base."""
    from transformers import AutoModelForCausalLM

    import deltakit
    from deltakit.format.digest_cache import ENV_SWITCH

    def load_save() -> None:
        AutoModelForCausalLM.from_pretrained(ft, dtype="auto").save_pretrained(work / "load-save")

    def load_save_synced() -> None:  # the same, then on disk as apply's default output is: fsync'd
        load_save()
        for path in (*sorted((work / "load-save").iterdir()), work / "load-save"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def apply() -> None:  # dqrelo is lossy: its output is not hashed by default
        deltakit.apply(base, delta, work / "applied", overwrite=True)

    def apply_fingerprinted() -> None:  # --fingerprint: the output hashed too
        deltakit.apply(base, delta, work / "applied", overwrite=True, fingerprint_output=True)

    def apply_no_sync() -> None:  # like save_pretrained: the disk writes are left to the kernel
        deltakit.apply(base, delta, work / "applied", overwrite=True, sync=False)

    def compress() -> None:
        deltakit.compress(
            base, ft, work / "compressed", method="dqrelo", ratio=1 / 8, config=CONFIG, overwrite=True
        )

    fresh = work / "fresh-finetune"  # a copy of the fine-tune no digest is kept for (made untimed)

    def compress_new_finetune() -> None:
        deltakit.compress(
            base, fresh, work / "compressed", method="dqrelo", ratio=1 / 8, config=CONFIG, overwrite=True
        )

    def uncached(fn):
        def run() -> None:
            os.environ[ENV_SWITCH] = "0"
            try:
                fn()
            finally:
                os.environ.pop(ENV_SWITCH, None)

        return run

    times: dict[str, list[float]] = {}
    apply()  # digests remembered before the timed runs
    for _ in range(repeats):
        for key, fn in (
            ("load_save_s", load_save),
            ("load_save_synced_s", load_save_synced),
            ("apply_s", apply),
            ("apply_fingerprint_s", apply_fingerprinted),
            ("apply_uncached_s", uncached(apply_fingerprinted)),
            ("apply_no_sync_s", apply_no_sync),
            ("compress_dqrelo_s", compress),
            ("compress_dqrelo_uncached_s", uncached(compress)),
            ("compress_dqrelo_new_finetune_s", compress_new_finetune),
        ):
            if fn is compress_new_finetune:  # untimed: copied before, removed after
                shutil.rmtree(fresh, ignore_errors=True)
                shutil.copytree(ft, fresh)
            os.sync()  # untimed: no earlier command's dirty pages are written back inside this one
            try:
                times.setdefault(key, []).append(median_time(fn, 1))
            finally:
                if fn is compress_new_finetune:
                    shutil.rmtree(fresh)
    out = {key: statistics.median(values) for key, values in times.items()}
    ls = out["load_save_s"]
    out["ratio_apply_over_load_save"] = out["apply_s"] / ls
    out["ratio_apply_fingerprint_over_load_save"] = out["apply_fingerprint_s"] / ls
    out["ratio_apply_uncached_over_load_save"] = out["apply_uncached_s"] / ls
    out["ratio_apply_no_sync_over_load_save"] = out["apply_no_sync_s"] / ls
    out["ratio_apply_over_load_save_synced"] = out["apply_s"] / out["load_save_synced_s"]
    out["ratio_compress_over_load_save"] = out["compress_dqrelo_s"] / ls
    out["ratio_compress_uncached_over_load_save"] = out["compress_dqrelo_uncached_s"] / ls
    out["ratio_compress_new_finetune_over_load_save"] = out["compress_dqrelo_new_finetune_s"] / ls
    return out


def cli_compress_s(base: Path, ft: Path, out: Path) -> float:
    command = [sys.executable, "-m", "deltakit_cli.main", "compress", str(ft), "--base", str(base)]
    command += ["-o", str(out), "--method", "dqrelo", "--ratio", "1/8", "--overwrite"]
    command += ["--set", f"factor_bits={CONFIG['factor_bits']}"]
    t = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def bench_busy(base: Path, ft: Path, work: Path, repeats: int) -> dict:
    idle = [cli_compress_s(base, ft, work / "busy-out") for _ in range(repeats)]
    busy_loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        busy = [cli_compress_s(base, ft, work / "busy-out") for _ in range(repeats)]
    finally:
        busy_loop.kill()
        busy_loop.wait()
    return {
        "compress_cli_idle_s": statistics.median(idle),
        "compress_cli_busy_s": statistics.median(busy),
        "ratio_busy_over_idle": statistics.median(busy) / statistics.median(idle),
    }


# -- report ---------------------------------------------------------------------------------------
TARGETS = [
    ("swap cpu: swap / copy bound", ("swap_cpu", "ratio_swap_over_copy_bound"), "<= 3"),
    ("swap cpu: from_pretrained cold / swap", ("swap_cpu", "ratio_from_pretrained_cold_over_swap"), ">= 5"),
    (
        "swap cpu: swap / its fp32 low-rank products alone",
        ("swap_cpu", "ratio_swap_over_low_rank_product"),
        "–",
    ),
    ("swap cuda: swap / host->device bound", ("swap_cuda", "ratio_swap_over_h2d_bound"), "<= 2"),
    ("mixed 4x2 dqrelo / base tokens/s", ("mixed_dqrelo_cpu", "ratio_mixed_over_base"), ">= 0.5"),
    ("mixed 4x2 svd / base tokens/s", ("mixed_svd_cpu", "ratio_mixed_over_base"), ">= 0.7"),
    (
        "apply / load+save (base digests remembered; the lossy output not hashed, the default)",
        ("apply_compress", "ratio_apply_over_load_save"),
        "<= 1.3",
    ),
    (
        "apply --fingerprint / load+save (the output hashed too; base digests remembered)",
        ("apply_compress", "ratio_apply_fingerprint_over_load_save"),
        "<= 1.3",
    ),
    (
        "apply --fingerprint / load+save (every tensor hashed)",
        ("apply_compress", "ratio_apply_uncached_over_load_save"),
        "<= 1.3",
    ),
    (
        "apply --no-sync / load+save (neither waits for the disk; digests remembered)",
        ("apply_compress", "ratio_apply_no_sync_over_load_save"),
        "–",
    ),
    (
        "apply / load+save with an fsync of its files (both durable; digests remembered)",
        ("apply_compress", "ratio_apply_over_load_save_synced"),
        "–",
    ),
    (
        "compress dqrelo / load+save (both checkpoints' digests remembered)",
        ("apply_compress", "ratio_compress_over_load_save"),
        "<= 2.5",
    ),
    (
        "compress dqrelo / load+save (new fine-tune, base digests remembered)",
        ("apply_compress", "ratio_compress_new_finetune_over_load_save"),
        "<= 2.5",
    ),
    (
        "compress dqrelo / load+save (every tensor hashed)",
        ("apply_compress", "ratio_compress_uncached_over_load_save"),
        "<= 2.5",
    ),
    ("compress busy / idle", ("busy", "ratio_busy_over_idle"), "<= 2"),
]


def report(result: dict) -> str:
    lines = [
        "# Speed (issue 13 targets)",
        "",
        f"Fleet: {result['fleet']}. Machine: {result['machine']}, {result['cpus']} usable CPUs, "
        f"torch threads {result['threads']}, CUDA: {result['cuda'] or 'none'}. Command: `{result['command']}`.",
        "Ratios are measured side by side in this one run (medians).",
        "",
        "| target | measured | wanted |",
        "| --- | ---: | :---: |",
    ]
    for label, (section, key), wanted in TARGETS:
        value = result.get(section, {}).get(key)
        if value is not None:
            lines.append(f"| {label} | {value:.3g} | {wanted} |")
    lines += ["", "Raw figures: `speed.json` next to this file.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny local model: a smoke test in seconds")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--factor-bits",
        type=int,
        default=16,
        help="factor width of the measured deltas (16: the fp16 factors issue 13's figures were taken on; "
        "the codecs' default is 4, which buys about 4x the rank and so 4x the low-rank flops)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/deltakit-speed"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    CONFIG["factor_bits"] = args.factor_bits

    from deltakit.ops.threads import available_cpus, set_threads

    set_threads()
    work = args.work / ("tiny" if args.tiny else "smol")
    work.mkdir(parents=True, exist_ok=True)
    base, fts, kind = tiny_fleet(work) if args.tiny else real_fleet()
    dqrelo = compress_all(base, fts, work, "dqrelo")
    svd = compress_all(base, fts, work, "svd")
    prompt, steps = (8, 8) if args.tiny else (32, 32)
    result: dict = {
        "fleet": kind,
        "machine": cpu_name(),
        "cpus": available_cpus(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "command": "python benchmarks/speed.py"
        + (" --tiny" if args.tiny else "")
        + f" --repeats {args.repeats} --factor-bits {args.factor_bits}",
        "batch": {"deltas": 4, "rows_per_delta": 2, "prompt_tokens": prompt, "decode_steps": steps},
    }
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        print(f"swaps on {device} ...", flush=True)
        result[f"swap_{device}"] = bench_swaps(base, fts, dqrelo, work, args.repeats, device)
        for method, deltas in (("dqrelo", dqrelo), ("svd", svd)):
            print(f"mixed batch {method} on {device} ...", flush=True)
            result[f"mixed_{method}_{device}"] = bench_mixed(
                base, deltas, args.repeats, device, prompt, steps
            )
    print("apply / compress vs load+save ...", flush=True)
    result["apply_compress"] = bench_apply_compress(base, fts[0], dqrelo[0], work, args.repeats)
    print("compress idle vs busy ...", flush=True)
    result["busy"] = bench_busy(base, fts[0], work, max(1, args.repeats // 2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "speed.md").write_text(report(result))
    print(report(result))


if __name__ == "__main__":
    main()
