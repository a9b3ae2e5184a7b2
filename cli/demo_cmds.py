"""``deltakit demo``: the end-to-end path on the real SmolLM2-135M fleet in one command.

Builds (or reuses) the base and one fine-tuned variant, compresses the fine-tune with each chosen
codec, applies the delta, evaluates the rebuilt model against the fine-tune, and prints the table.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from deltakit_cli.common import emit_json, err_console, human_bytes, out_console, parse_ratio, progress_bar


@click.command()
@click.option("--variant", default="shakespeare", show_default=True, help="fleet variant (a text domain)")
@click.option("--method", "methods", multiple=True, help="codec(s) to run [default: dqrelo]")
@click.option("--ratio", default="1/8", show_default=True, help="size as a fraction of the fp16 delta")
@click.option("--max-tokens", type=int, default=2048, show_default=True, help="evaluation tokens per text")
@click.option("--workdir", type=click.Path(path_type=Path), help="where deltas and rebuilt models go")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def demo(variant, methods, ratio, max_tokens, workdir, as_json):
    """Build or reuse one SmolLM2 fine-tune, compress it (dqrelo), apply, evaluate, print the table."""
    import deltakit
    from deltakit.codecs.registry import get_codec
    from deltakit.eval.report import evaluate_delta
    from deltakit.zoo import fleet as zf
    from deltakit.zoo.base import base_dir
    from deltakit.zoo.paths import cache_dir

    methods = list(methods) or ["dqrelo"]
    ratio_value = parse_ratio(ratio)
    workdir = workdir or cache_dir() / "demo"
    started = time.perf_counter()
    err_console.print(
        f"[bold]1/4[/] fleet: base SmolLM2-135M-Instruct + variant [cyan]{variant}[/] (cached after the first run)"
    )
    with progress_bar("fleet", enabled=not as_json) as progress:
        report = (
            (lambda name, stage, done, total: progress(done, total, f"{name}: {stage}")) if progress else None
        )
        record = zf.build_fleet([variant], report=report)[0]
    base, finetune = base_dir(), Path(record["path"])
    candidates, sizes = {}, {}
    for method in methods:
        codec = get_codec(method)
        label = f"{method}" if codec.default_ratio is None else f"{method}@{ratio}"
        codec_ratio = None if codec.default_ratio is None else ratio_value
        if codec.ratio_range and codec_ratio is not None and codec.ratio_range[0] == codec.ratio_range[1]:
            codec_ratio = codec.ratio_range[0]
            label = f"{method}@1/{round(1 / codec_ratio)}"
        delta_dir, rebuilt = workdir / f"delta-{method}", workdir / f"rebuilt-{method}"
        err_console.print(f"[bold]2/4[/] compress {finetune.name} with [cyan]{method}[/] → {delta_dir}")
        with progress_bar(f"compress ({method})", enabled=not as_json) as progress:
            delta = deltakit.compress(
                base, finetune, delta_dir, method=method, ratio=codec_ratio, overwrite=True, progress=progress
            )
        err_console.print(f"[bold]3/4[/] apply → {rebuilt}")
        with progress_bar("apply", enabled=not as_json) as progress:
            deltakit.apply(base, delta_dir, rebuilt, overwrite=True, progress=progress)
        candidates[label] = rebuilt
        sizes[label] = delta.manifest.stats
    err_console.print(
        f"[bold]4/4[/] evaluate against the fine-tune ({max_tokens} tokens of held-out and general text)"
    )
    with progress_bar("evaluate", enabled=not as_json) as progress:
        cb = (lambda stage, done, total: progress(done, total, stage)) if progress else None
        report = evaluate_delta(base, finetune, candidates, max_tokens=max_tokens, progress=cb)
    seconds = time.perf_counter() - started
    if as_json:
        emit_json(
            {
                "variant": variant,
                "base": str(base),
                "finetune": str(finetune),
                "sizes": sizes,
                "evaluation": report,
                "seconds": round(seconds, 1),
            }
        )
        return
    for text, entry in report["texts"].items():
        table = Table(title=f"{text}  ({entry['tokens']} tokens)", title_justify="left")
        for column in ("model", "size", "ratio", "ppl", "KL(ft‖·)", "KL closed", "top-1", "gain kept"):
            table.add_column(column, justify="left" if column == "model" else "right")
        table.add_row(
            "base",
            "",
            "",
            f"{entry['ppl_base']:.2f}",
            f"{entry['kl_ft_base']:.4f}",
            "0",
            f"{entry['top1_base']:.4f}",
            "0",
        )
        table.add_row("fine-tune", "", "", f"{entry['ppl_finetune']:.2f}", "0", "1", "1", "1")
        for name, m in entry["candidates"].items():
            stats = sizes[name]
            table.add_row(
                name,
                human_bytes(stats["stored_bytes"]),
                f"{stats['ratio']:.4f}" if stats["ratio"] else "-",
                f"{m['ppl']:.2f}",
                f"{m['kl']:.4f}",
                _fmt(m["kl_closed"]),
                f"{m['top1']:.4f}",
                _fmt(m["gain_kept"]),
            )
        out_console.print(table)
    out_console.print(f"[dim]{seconds:.0f}s · deltas and rebuilt models in {workdir}[/]")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
