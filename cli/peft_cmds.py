"""``export-peft`` and ``import-peft``: low-rank deltas to and from PEFT LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import click

from deltakit_cli.common import emit_json, out_console, parse_ratio


@click.command("export-peft")
@click.argument("delta")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="adapter directory")
@click.option("--fold-rank", type=click.IntRange(min=1), help="fold sign parts into rank-R LoRA factors")
@click.option("--modules-to-save", is_flag=True, help="write exactly stored modules (norms) whole")
@click.option("--base", help="base model dir or registry base name: report the KL to the delta's apply")
@click.option("--check-text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="text for the KL check (default: seeded random tokens)")  # fmt: skip
@click.option("--base-name", help="base_model_name_or_path to record (default: the delta's base name)")
@click.option("--registry", "registry_path", type=click.Path(path_type=Path), help="registry directory")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def export_peft(
    delta, output, fold_rank, modules_to_save, base, check_text, base_name, registry_path, overwrite, as_json
):
    """Write low-rank DELTA (a directory or NAME[:TAG]) as a PEFT LoRA adapter directory."""
    from deltakit.interop.peft_export import export_peft as run
    from deltakit.refs import resolve_base_dir, resolve_delta_dir

    delta_dir = resolve_delta_dir(delta, registry_path)
    report = run(
        delta_dir, output, fold_rank=fold_rank, modules_to_save=modules_to_save, base_name=base_name,
        overwrite=overwrite,
    )  # fmt: skip
    if base is not None or check_text is not None:
        from deltakit.interop.peft_check import adapter_kl

        if base is None:
            raise click.UsageError("--check-text needs --base")
        text = check_text.read_text(encoding="utf-8", errors="replace") if check_text else None
        report.kl = adapter_kl(resolve_base_dir(base, registry_path), delta_dir, output, text=text)
    result = report.to_dict()
    if as_json:
        emit_json(result)
        return
    ranks = sorted(set(report.lora_modules.values()))
    out_console.print(
        f"[green]wrote[/] {output}: {len(report.lora_modules)} LoRA module(s), rank(s) {ranks}, "
        f"{report.unchanged} unchanged tensor(s)"
    )
    if report.folded:
        worst = max(report.folded.values())
        out_console.print(
            f"folded {len(report.folded)} sign part(s) at rank {fold_rank}; worst rel. error {worst:.4f}"
        )
    if report.modules_to_save:
        out_console.print(f"modules_to_save (whole, exact): {', '.join(report.modules_to_save)}")
    if report.kl is not None:
        out_console.print(f"KL(delta apply ‖ adapter) {report.kl:.3g} nats/token")


@click.command("import-peft")
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--base", required=True, help="base model directory or registry base name")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="delta directory to write")
@click.option("--to", "to_ref", metavar="NAME[:TAG]", help="push the delta into the registry under this name")
@click.option("--method", "-m", help="recompress the merged adapter with this codec (default: exact svd)")
@click.option("--ratio", help="with --method: size as a fraction of the fp16 delta")
@click.option("--registry", "registry_path", type=click.Path(path_type=Path), help="registry directory")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
def import_peft(adapter, base, output, to_ref, method, ratio, registry_path, overwrite, as_json):
    """Turn PEFT LoRA ADAPTER into a deltakit delta against --base (-o DIR and/or --to NAME[:TAG])."""
    from deltakit.interop.peft_import import import_peft as run
    from deltakit.refs import resolve_base_dir

    if output is None and to_ref is None:
        raise click.UsageError("give -o/--output DIR, --to NAME[:TAG], or both")
    base_dir = resolve_base_dir(base, registry_path)
    kwargs = dict(method=method, ratio=parse_ratio(ratio), overwrite=overwrite)
    pushed = None
    if to_ref is None:
        delta = run(adapter, base_dir, output, **kwargs)
    else:
        from deltakit.publish import publish_delta

        delta, pushed = publish_delta(lambda out: run(adapter, base_dir, out, **kwargs), to_ref,
                                      registry=registry_path, output=output)  # fmt: skip
    stats = delta.manifest.stats
    result = {"path": str(output) if output else None, "codec": delta.manifest.codec.name, "stats": stats}
    if pushed is not None:
        result["registry"] = pushed
    if as_json:
        emit_json(result)
    else:
        where = output if output is not None else to_ref
        out_console.print(
            f"[green]wrote[/] {where}: {result['codec']} delta, {stats.get('encoded_tensors')} encoded tensor(s)"
        )
