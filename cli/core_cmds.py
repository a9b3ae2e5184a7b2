"""``compress``, ``apply``, ``inspect``, ``verify`` and ``methods``: thin commands over deltakit's API."""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from deltakit_cli.common import (
    emit_json,
    err_console,
    human_bytes,
    out_console,
    parse_ratio,
    parse_sets,
    progress_bar,
)

DEVICE = click.Choice(["cpu", "cuda"])


@click.command()
@click.option(
    "--method", "-m", default="dqrelo", show_default=True, help="codec name (see `deltakit methods`)"
)
@click.option(
    "--base",
    "base_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="base model directory (omit to compress a model's own weights with lillama/deltallm)",
)
@click.argument("finetuned", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="delta directory to write")
@click.option("--to", "to_ref", metavar="NAME[:TAG]", help="push the delta into the registry under this name")
@click.option("--registry", "registry_path", type=click.Path(path_type=Path), help="registry directory")
@click.option("--ratio", help="size as a fraction of the fp16 delta, e.g. 1/8 or 0.125")
@click.option("--rank", type=int, help="fixed rank for low-rank codecs (instead of --ratio)")
@click.option(
    "--bits-per-weight", "bits_per_weight", type=float, help="coded bits per weight of the encoded matrices"
)
@click.option("--size", "size", help="size of the whole delta's stored tensors: 123456, 12MB or 12MiB")
@click.option(
    "--allocation",
    type=click.Choice(["uniform", "rd"]),
    help="spread a size target: one ratio everywhere, or rate-distortion (default rd where the codec can)",
)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="codec config field (repeatable)")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--exclude-role",
    "exclude_roles",
    multiple=True,
    type=click.Choice(["embedding", "lm_head", "linear", "other"]),
    help="store matrices of this role exactly instead of encoding them (repeatable)",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="calibration text (file, directory or JSONL; repeatable) for data-aware codecs, "
    "--refine-scales and --weight-allocation",
)
@click.option(
    "--weight-allocation",
    "weight_allocation",
    is_flag=True,
    help="weight --allocation rd by each layer's input energy on --data (off by default: it lowered KL "
    "closed on the fleet, docs/rate_distortion/README.md)",
)
@click.option(
    "--tokens",
    type=click.IntRange(min=1),
    help="calibration token budget (default: 65536, or all of a shorter --data text from 16 windows on)",
)
@click.option("--seq-len", type=int, default=256, show_default=True, help="calibration window length")
@click.option(
    "--refine-scales",
    "refine_scales",
    is_flag=True,
    help="fit the sign scales and per-singular-vector scales on --data against the fine-tune's logits "
    "(bitdelta, dqrelo, svd, deltacome, lillama; same bytes)",
)
@click.option("--refine-steps", type=int, help="Adam steps of --refine-scales (default 20)")
@click.option(
    "--refine-lr",
    type=float,
    help="learning rate of --refine-scales, relative to each scale (default 0.1, or 0.05 above 80 "
    "fitted scales per matrix)",
)
@click.option("--refine-batch", type=int, help="calibration windows per refinement step (default 4)")
@click.option(
    "--reduction", type=float, help="fraction of parameters to remove (model compression, no --base)"
)
@click.option("--name", "target_name", help="name recorded for the fine-tune (default: its directory name)")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def compress(
    method,
    base_dir,
    finetuned,
    output,
    to_ref,
    registry_path,
    ratio,
    rank,
    bits_per_weight,
    size,
    allocation,
    sets,
    device,
    seed,
    exclude_roles,
    data,
    tokens,
    seq_len,
    weight_allocation,
    refine_scales,
    refine_steps,
    refine_lr,
    refine_batch,
    reduction,
    target_name,
    overwrite,
    as_json,
):
    """Compress FINETUNED against --base into a delta directory (-o) or the registry (--to).

    Without --base, model compressors (lillama, deltallm) compress FINETUNED's own weights
    into a smaller model directory (-o) by --reduction.
    """
    from deltakit.core.options import CompressOptions

    if base_dir is not None and output is None and to_ref is None:
        raise click.UsageError("give -o/--output DIR, --to NAME[:TAG], or both")
    if base_dir is None and output is None:
        raise click.UsageError("compressing a model (no --base) needs -o/--output DIR")
    ratio_value = parse_ratio(ratio)
    if ratio_value is not None and rank is not None:
        raise click.UsageError("give --ratio or --rank, not both")
    options = CompressOptions(
        method=method,
        ratio=ratio_value,
        rank=rank,
        bits_per_weight=bits_per_weight,
        size=parse_size(size),
        allocation=allocation,
        reduction=reduction,
        overrides=parse_sets(sets),
        device=device,
        seed=seed,
        data=tuple(data) or None,
        tokens=tokens,
        seq_len=seq_len,
        refine_scales=refine_scales,
        weight_allocation=weight_allocation,
        target_name=target_name,
        exclude_roles=tuple(exclude_roles),
        overwrite=overwrite,
    )
    given = {"refine_steps": refine_steps, "refine_lr": refine_lr, "refine_batch": refine_batch}
    options = CompressOptions.build(options, **{k: v for k, v in given.items() if v is not None})
    started = time.perf_counter()
    if base_dir is None:
        _compress_model(finetuned, output, options, as_json, started)
    else:
        _compress_delta(base_dir, finetuned, output, to_ref, registry_path, options, as_json, started)


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(value: str | None) -> int | None:
    """``123456``, ``12MB`` (10^6) or ``12MiB`` (2^20) -> bytes (whole, floored)."""
    if value is None:
        return None
    text = value.strip()
    number = text.rstrip("kKmMgGiIbB ")
    unit = text[len(number) :].strip().upper()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in _UNITS or not amount > 0:
        raise click.BadParameter(f"{value!r} is not a size (write 123456, 12MB or 12MiB)")
    return int(amount * _UNITS[unit])


def _compress_delta(base_dir, finetuned, output, to_ref, registry_path, options, as_json, started) -> None:
    import deltakit

    with progress_bar(f"compress ({options.method})", enabled=not as_json) as progress:
        if to_ref is None:
            delta = deltakit.compress(base_dir, finetuned, output, options=options, progress=progress)
            pushed = None
        else:
            from deltakit.publish import compress_to_registry

            delta, pushed = compress_to_registry(
                base_dir, finetuned, to_ref, registry=registry_path, output=output, options=options,
                progress=progress,
            )  # fmt: skip
    result = _delta_result(delta, output)
    result["seconds"] = round(time.perf_counter() - started, 3)
    if pushed is not None:
        result["registry"] = pushed
    if as_json:
        emit_json(result)
        return
    stats = result["stats"]
    where = f"{output}" if output is not None else to_ref
    out_console.print(
        f"[green]wrote[/] {escape(str(where))}: {escape(result['codec'])} · {human_bytes(stats['stored_bytes'])} stored · "
        f"ratio {_fmt_ratio(stats.get('ratio'))} of the fp16 delta · "
        f"{stats['encoded_tensors']} encoded, {stats['passthrough_tensors']} exact, "
        f"{stats['unchanged_tensors']} unchanged · {result['seconds']:.1f}s"
    )


def _compress_model(model_dir, output, options, as_json, started) -> None:
    import deltakit

    with progress_bar(f"compress model ({options.method})", enabled=not as_json) as progress:
        report = deltakit.compress_model(model_dir, output, options=options, progress=progress)
    result = {
        "path": str(output),
        "method": options.method,
        "report": report,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        emit_json(result)
    else:
        out_console.print(
            f"[green]wrote[/] {escape(str(output))}: {escape(options.method)} compressed model · "
            f"{result['seconds']:.1f}s"
        )


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="checkpoint directory to write"
)
@click.option(
    "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="cast the output weights"
)
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def export(model_dir, output, dtype, overwrite, as_json):
    """Materialise a compressed model (lillama, deltallm) as a plain Hugging Face checkpoint."""
    import torch

    from deltakit.core.model_mode import export_model

    started = time.perf_counter()
    export_model(model_dir, output, dtype=getattr(torch, dtype) if dtype else None, overwrite=overwrite)
    result = {"output": str(output), "seconds": round(time.perf_counter() - started, 3)}
    if as_json:
        emit_json(result)
    else:
        out_console.print(f"[green]wrote[/] {escape(str(output))} ({result['seconds']:.1f}s)")


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.4f} (1/{1 / ratio:.1f})" if ratio > 0 else "0"


def _delta_result(delta, path: Path | None) -> dict:
    from deltakit.core.inspect import manifest_summary

    summary = manifest_summary(delta.manifest)
    keys = ("codec", "config", "budget", "base", "target", "stats")
    return {"path": str(path) if path is not None else None, **{k: summary[k] for k in keys}}


def resolve_delta_arg(delta: str, registry_path: Path | None) -> Path:
    """A delta argument is a directory, or a registry reference NAME[:TAG] when no such directory exists."""
    from deltakit.refs import resolve_delta_dir

    return resolve_delta_dir(delta, registry_path)


def resolve_base_arg(base: str, registry_path: Path | None) -> Path:
    """A base argument is a model directory, or a registry base name when no such directory exists."""
    from deltakit.refs import resolve_base_dir

    return resolve_base_dir(base, registry_path)


@click.command()
@click.argument("base")
@click.argument("delta")
@click.option(
    "-o", "--output", required=True, type=click.Path(path_type=Path), help="model directory to write"
)
@click.option(
    "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), help="cast the output weights"
)
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="apply even if the base fingerprint differs from the delta's")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option(
    "--no-sync",
    is_flag=True,
    help="return without waiting for the output to reach the disk: faster, but an OS crash or power "
    "loss soon after can leave it incomplete (and lose the output --overwrite replaced)",
)
@click.option(
    "--fingerprint/--no-fingerprint",
    "fingerprint_output",
    default=None,
    help="hash the output and say whether it is the exact fine-tune (default: only for an exact codec "
    "such as lossless; a lossy codec's output is approximate by design)",
)
@click.option("--registry", "registry_path", type=click.Path(path_type=Path), help="registry directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def apply(
    base, delta, output, dtype, device, force, overwrite, no_sync, fingerprint_output, registry_path, as_json
):
    """Rebuild the fine-tune from BASE and DELTA (a directory or NAME[:TAG] in the registry)."""
    import deltakit

    delta_path = resolve_delta_arg(delta, registry_path)
    base = resolve_base_arg(base, registry_path)
    started = time.perf_counter()
    with progress_bar("apply", enabled=not as_json) as progress:
        report = deltakit.apply(
            base,
            delta_path,
            output,
            dtype=dtype,
            device=device,
            force=force,
            overwrite=overwrite,
            sync=not no_sync,
            fingerprint_output=fingerprint_output,
            progress=progress,
        )
    result = {
        "output": str(output),
        "tensors": report.tensors,
        "base_fingerprint": report.base_fingerprint,
        "output_fingerprint": report.output_fingerprint,
        "matches_target": report.matches_target,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if as_json:
        emit_json(result)
    else:
        if report.matches_target is None:  # not hashed: a lossy codec's output, or --no-fingerprint
            exact = "output not fingerprinted" if fingerprint_output is False else "approximate fine-tune"
        else:
            exact = "bit-exact fine-tune" if report.matches_target else "approximate fine-tune"
        out_console.print(
            f"[green]wrote[/] {escape(str(output))}: {report.tensors} tensors, {exact}, {result['seconds']:.1f}s"
        )


@click.command()
@click.argument("delta")
@click.option("--tensors/--no-tensors", default=True, help="show the per-tensor table")
@click.option("--registry", "registry_path", type=click.Path(path_type=Path), help="registry directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def inspect(delta, tensors, registry_path, as_json):
    """Show a delta's codec, sizes, ratio against the fp16 delta, and per-tensor table.

    On a compressed model (lillama, deltallm) it shows the codec's plan and parameter counts.
    """
    from deltakit.core.decode import load_delta
    from deltakit.core.inspect import inspect_delta
    from deltakit.core.model_mode import describe_model, is_compressed_model

    if is_compressed_model(delta):
        name, description, lines = describe_model(delta)
        if as_json:
            emit_json(description)
        else:
            out_console.print(
                f"[bold]{escape(delta)}[/]  compressed model, compressor [cyan]{escape(name)}[/]"
            )
            for line in lines:
                out_console.print(line, highlight=False, markup=False)
        return
    loaded = load_delta(resolve_delta_arg(delta, registry_path), verify=False)
    manifest = loaded.manifest
    summary = inspect_delta(loaded, tensors=tensors or as_json)
    if as_json:
        emit_json(summary)
        return
    stats = manifest.stats
    out_console.print(
        f"[bold]{escape(delta)}[/]  codec [cyan]{escape(manifest.codec.name)}[/] v{manifest.codec.version}  "
        f"format v{manifest.format_version}"
    )
    out_console.print(f"base   {manifest.base.name}  {manifest.base.fingerprint[:23]}…", markup=False)
    out_console.print(f"target {manifest.target.name}  {manifest.target.fingerprint[:23]}…", markup=False)
    out_console.print(f"config {manifest.codec.config}  budget {manifest.codec.budget}", markup=False)
    out_console.print(
        f"stored {human_bytes(stats.get('stored_bytes'))} (encoded {human_bytes(stats.get('encoded_bytes'))}, "
        f"exact {human_bytes(stats.get('passthrough_bytes'))}) · fp16 delta {human_bytes(stats.get('fp16_delta_bytes'))}"
        f" · ratio {_fmt_ratio(stats.get('ratio'))}"
    )
    if stats.get("allocation"):
        weighting = stats.get("allocation_weighting")
        how = f", {weighting}-weighted on {stats.get('calibration_tokens')} tokens" if weighting else ""
        out_console.print(f"allocation {stats['allocation']}{how}", markup=False)
    refined = stats.get("scale_refinement")
    if isinstance(refined, dict):
        out_console.print(_refinement_line(refined), markup=False, highlight=False)
    if tensors:
        table = Table(show_edge=False)
        for column in ("tensor", "kind", "role", "dtype", "shape", "stored", "ratio"):
            table.add_column(column, justify="right" if column in ("stored", "ratio") else "left")
        for row in summary["tensors"]:
            table.add_row(
                Text(row["name"]),
                Text(row["kind"]),
                Text(row["role"] or ""),
                Text(row["dtype"]),
                "×".join(map(str, row["shape"])),
                human_bytes(row["stored_bytes"]),
                f"{row['ratio']:.4f}" if row["ratio"] else "",
            )
        out_console.print(table)


def _components(report: dict) -> str:
    """`` (N component scales)`` when the report counts low-rank components, else empty."""
    count = report.get("components")
    ok = isinstance(count, int) and not isinstance(count, bool) and count > 0
    return f" ({count} component scales)" if ok else ""


def _refinement_line(report: dict) -> str:
    """One line on a delta's refined scales (``stats.scale_refinement``; any field may be malformed)."""

    def num(value) -> str:
        return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"

    kept = "refined scales kept" if report.get("applied") is True else "data-free scales kept (no KL gain)"
    return (
        f"scales refined on {num(report.get('tokens'))} tokens, {num(report.get('steps'))} steps, "
        f"lr {num(report.get('lr'))}{' (default)' if report.get('lr_default') is True else ''}, "
        f"{num(report.get('tensors'))} matrices{_components(report)}: calibration KL "
        f"{num(report.get('kl_before'))} -> "
        f"{num(report.get('kl_fitted'))}, {kept}"
    )


@click.command()
@click.argument("delta")
@click.option(
    "--base",
    "base_dir",
    help="also check that this is the base the delta was made from (directory or registry base name)",
)
@click.option("--registry", "registry_path", type=click.Path(path_type=Path), help="registry directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def verify(delta, base_dir, registry_path, as_json):
    """Check a delta's file hashes (and its base's fingerprint with --base)."""
    import deltakit

    base_dir = resolve_base_arg(base_dir, registry_path) if base_dir is not None else None
    report = deltakit.verify(resolve_delta_arg(delta, registry_path), base=base_dir)
    report["ok"] = True
    if as_json:
        emit_json(report)
    else:
        base_note = ", base fingerprint matches" if report["base_checked"] else ""
        out_console.print(
            f"[green]ok[/] {escape(delta)}: {report['files_checked']} file(s) verified{base_note}"
        )


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def methods(as_json):
    """List the registered delta codecs and model compressors with their config fields."""
    from deltakit.codecs.registry import get_codec, list_codecs
    from deltakit.compressors.registry import get_compressor, list_compressors

    described = [{**type(get_codec(name)).describe(), "kind": "codec"} for name in list_codecs()]
    described += [
        {**type(get_compressor(name)).describe(), "kind": "compressor", "default_ratio": None}
        for name in list_compressors()
    ]
    if as_json:
        emit_json(described)
        return
    for info in described:
        if info["kind"] == "compressor":
            ratio = "model compressor: no --base, size by --reduction"
        else:
            ratio = (
                f"default ratio {info['default_ratio']:g}" if info["default_ratio"] else "size not budgeted"
            )
            if info.get("ratio_range"):
                low, high = info["ratio_range"]
                ratio += (
                    f", ratio {low:g} only" if low == high else f", ratios {low:g}–{high:g}"
                ) + f" (from {16 * low:g} bits per weight plus its scales)"
        data = " · needs calibration data" if info["needs_data"] else ""
        out_console.print(
            f"[bold cyan]{info['name']}[/] v{info['version']}: {info['summary']} ({ratio}{data})"
        )
        if not info["config"]:
            continue
        table = Table(show_header=False, show_edge=False, box=None, padding=(0, 2))
        for field in info["config"]:
            choices = f" ({' | '.join(map(str, field['choices']))})" if field["choices"] else ""
            table.add_row(f"  --set {field['name']}={field['default']}", field["help"] + choices)
        out_console.print(table)
    err_console.print("[dim]sizes: --ratio R (fraction of the fp16 delta) or --rank R[/]")
