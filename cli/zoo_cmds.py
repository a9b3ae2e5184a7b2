"""``deltakit fleet``: build, list and locate the real fleet (SmolLM2-135M base + fine-tuned variants)."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _split_names(values: tuple[str, ...]) -> list[str]:
    """``--variants a,b --variants c`` → ``[a, b, c]``."""
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


@click.group("fleet")
def fleet() -> None:
    """The real fleet: SmolLM2-135M-Instruct (bf16) and fine-tunes on distinct text domains.

    Cached under the deltakit cache dir (env DELTAKIT_CACHE overrides it), in zoo/.
    """


@fleet.command("build")
@click.option(
    "--variants",
    multiple=True,
    metavar="NAMES",
    help="Domains to fine-tune on, comma-separated or repeated (default: shakespeare, milton, "
    "fortunes-computers, jargon, fortunes-politics and shakespeare-heavy, the last ~50 min alone; "
    "also shakespeare-long (17 000 steps: use --device cuda) and any fortunes-<category>).",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=None, help="Optimizer steps per variant [default: 40]."
)
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Peak learning rate [3e-4]."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Training seed (batch order).")
@click.option("--apt", is_flag=True, help="Install missing Debian text packages with apt-get (root only).")
@click.option("--force", is_flag=True, help="Rebuild even when a cached variant has the same recipe.")
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where training runs: cpu or cuda (shakespeare-long, 17 000 steps, takes ~14 h on 2 CPU cores).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the variants' records as JSON on stdout.")
def build_cmd(
    variants: tuple[str, ...],
    steps: int | None,
    lr: float | None,
    seed: int,
    apt: bool,
    force: bool,
    device: str,
    as_json: bool,
):
    """Build (or reuse) the base checkpoint and the fine-tuned variants (~5 min a variant on 2 idle CPU cores)."""
    from deltakit.zoo import fleet as zf

    names = _split_names(variants) or list(zf.DEFAULT_VARIANTS)
    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=as_json) as prog:
        tasks: dict[str, int] = {}

        def report(variant: str, stage: str, done: int, total: int) -> None:
            key = variant if not variant.startswith(("heldout:", "general:")) else f"{variant} (base ppl)"
            if key not in tasks:
                tasks[key] = prog.add_task(key, total=total)
            prog.update(tasks[key], description=f"{key}: {stage}", completed=done, total=total)

        records = zf.build_fleet(
            names,
            steps=steps if steps is not None else zf.DEFAULT_STEPS,
            lr=lr if lr is not None else zf.DEFAULT_LR,
            seed=seed,
            force=force,
            report=report,
            apt=apt,
            device=device,
        )
    if as_json:
        click.echo(json.dumps({"schema": 1, "variants": records}, indent=2))
    else:
        _print_fleet(records)


def _print_fleet(records: list[dict]) -> None:
    table = Table(title="deltakit fleet")
    for col in ("variant", "steps", "lr", "held-out ppl base → ft", "general ppl base → ft", "path"):
        table.add_column(col)
    for r in records:
        ev, rc = r.get("eval", {}), r.get("recipe", {})
        table.add_row(
            r["name"],
            str(rc.get("steps", "?")),
            f"{rc.get('lr', float('nan')):.0e}",
            f"{ev.get('ppl_base', float('nan')):.2f} → {ev.get('ppl_finetune', float('nan')):.2f}",
            f"{ev.get('general_ppl_base', float('nan')):.2f} → {ev.get('general_ppl_finetune', float('nan')):.2f}",
            r.get("path", ""),
        )
    Console().print(table)


@fleet.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON on stdout.")
def ls_cmd(as_json: bool) -> None:
    """List the built variants with their recipe and held-out / general perplexities."""
    from deltakit.zoo import fleet as zf

    records = zf.list_fleet()
    if as_json:
        click.echo(
            json.dumps({"schema": 1, "base": str(zf.base_mod.base_dir()), "variants": records}, indent=2)
        )
    elif not records:
        click.echo("no variants built; run `deltakit fleet build`", err=True)
    else:
        _print_fleet(records)


@fleet.command("path")
@click.argument("name")
def path_cmd(name: str) -> None:
    """Print the checkpoint dir of variant NAME ("base" for the base)."""
    from deltakit.zoo import fleet as zf

    click.echo(str(zf.variant_path(name)))
