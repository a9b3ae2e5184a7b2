"""``deltakit eval``: how well reconstructed deltas reproduce a fine-tune (KL, top-1, perplexity, weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


def _resolve(spec: str, registry_path: Path | None = None) -> Path:
    """A path as given, a fleet variant name (``base``, ``shakespeare``...), or a registry base name."""
    path = Path(spec)
    if path.exists():
        return path
    from deltakit.errors import DeltakitError
    from deltakit.zoo.fleet import variant_path

    try:
        return variant_path(spec)
    except DeltakitError:
        from deltakit.refs import resolve_base_dir

        return resolve_base_dir(spec, registry_path)


def _resolve_candidate(spec: str, registry_path: Path | None) -> Path:
    """A reconstruction: a delta or checkpoint directory, or a registry delta ref ``NAME[:TAG]``."""
    path = Path(spec)
    if path.exists():
        return path
    from deltakit.refs import resolve_delta_dir

    return resolve_delta_dir(spec, registry_path)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


@click.command("eval")
@click.option("--base", "base", required=True, help="Base checkpoint dir, or a fleet name (base).")
@click.option(
    "--finetune", "finetune", required=True, help="Fine-tuned checkpoint dir, or a fleet variant name."
)
@click.argument("deltas", nargs=-1, required=True)
@click.option(
    "--text",
    "text_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Domain text file(s) [default: the fine-tune's held-out text from its zoo.json].",
)
@click.option("--no-general", is_flag=True, help="Skip base-retention perplexity on pydoc_data.topics.")
@click.option(
    "--max-tokens", type=click.IntRange(min=2), default=4096, show_default=True, help="Tokens per text."
)
@click.option("--window", type=click.IntRange(min=2), default=256, show_default=True, help="Context window.")
@click.option("--no-weights", is_flag=True, help="Skip weight-space error against the true delta.")
@click.option(
    "--registry", "registry_path", type=click.Path(path_type=Path), help="Registry for NAME:TAG refs."
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON on stdout.")
def eval_command(
    base: str,
    finetune: str,
    deltas: tuple[str, ...],
    text_files: tuple[Path, ...],
    no_general: bool,
    max_tokens: int,
    window: int,
    no_weights: bool,
    registry_path: Path | None,
    as_json: bool,
) -> None:
    """Compare reconstructions DELTAS (delta dirs, checkpoint dirs or registry refs) with the fine-tune.

    Reports KL(fine-tune ‖ recon) per token, KL closed = 1 − KL(ft‖recon)/KL(ft‖base), top-1 agreement,
    perplexity and gain kept on the domain text, perplexity on general text, and weight error relative to
    the true delta.
    """
    from deltakit.eval.report import evaluate_delta

    base_dir, ft_dir = _resolve(base, registry_path), _resolve(finetune, registry_path)
    texts = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in text_files} or None
    err = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as prog:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        result = evaluate_delta(
            base_dir,
            ft_dir,
            [_resolve_candidate(d, registry_path) for d in deltas],
            texts,
            general=not no_general,
            window=window,
            max_tokens=max_tokens,
            weights=not no_weights,
            progress=report,
        )
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    print_result(result, Console())


def print_result(result: dict, console: Console) -> None:
    """One rich table per domain text; general-text perplexity and weight error as extra columns."""
    general = next((t for t in result["texts"].values() if t["kind"] == "general"), None)
    weights = result.get("weights", {})
    for tname, t in result["texts"].items():
        if t["kind"] != "domain":
            continue
        table = Table(title=f"{tname} ({t['tokens']} tokens) — reference: fine-tune")
        cols = ["model", "KL(ft‖·)", "KL closed", "top-1", "ppl", "gain kept"]
        cols += ["general ppl"] if general else []
        cols += ["weight err"] if weights else []
        for c in cols:
            table.add_column(c, justify="left" if c == "model" else "right")

        rows = [("finetune", 0.0, 1.0, 1.0, t["ppl_finetune"], 1.0, general and general["ppl_finetune"], 0.0)]
        rows.append(
            (
                "base",
                t["kl_ft_base"],
                0.0,
                t["top1_base"],
                t["ppl_base"],
                0.0,
                general and general["ppl_base"],
                1.0,
            )
        )
        for name, c in t["candidates"].items():
            gppl = general["candidates"][name]["ppl"] if general else None
            werr = weights.get(name, {}).get("overall")
            rows.append((name, c["kl"], c["kl_closed"], c["top1"], c["ppl"], c["gain_kept"], gppl, werr))
        for name, kl, closed, top1, ppl, gain, gppl, werr in rows:
            cells = [
                name,
                _fmt(kl),
                _fmt(closed, ".3f"),
                _fmt(top1, ".3f"),
                _fmt(ppl, ".2f"),
                _fmt(gain, ".3f"),
            ]
            cells += [_fmt(gppl, ".2f")] if general else []
            cells += [_fmt(werr, ".3f")] if weights else []
            table.add_row(*cells)
        console.print(table)
