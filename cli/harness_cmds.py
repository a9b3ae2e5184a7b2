"""``deltakit eval-harness``: lm-evaluation-harness tasks on base + delta, without a merged checkpoint.

Needs the ``harness`` extra (lm-eval). Local task YAML files are picked up with ``--include-path DIR``.
Exit codes: 2 for unknown tasks or a missing lm-eval, otherwise those of deltakit's errors.
"""

from __future__ import annotations

import math
from pathlib import Path

import click
from rich.table import Table

from deltakit_cli.common import emit_json, err_console, out_console


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` keeping numeric values (the harness also reports aliases and names)."""
    return {
        task: {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, values in results.get("results", {}).items()
    }


def _table(rows: list[dict]) -> Table:
    table = Table(show_edge=False)
    for column in ("model", "task", "metric", "value"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for row in rows:
        for task, metrics in row["tasks"].items():
            for metric, value in sorted(metrics.items()):
                if "_stderr" in metric:
                    continue
                shown = "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"
                table.add_row(row["delta"] or "base", task, metric, shown)
    return table


@click.command("eval-harness")
@click.option("--base", required=True, help="base checkpoint dir or registered base name")
@click.argument("deltas", nargs=-1)
@click.option("--tasks", required=True, help="comma-separated harness task names")
@click.option("--include-path", "include_paths", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="directory of local task YAML files (repeatable)")  # fmt: skip
@click.option("--with-base", is_flag=True, help="also evaluate the base alone (first row)")
@click.option("--limit", type=float, help="documents per task (a count, or a fraction below 1)")
@click.option("--num-fewshot", type=click.IntRange(min=0), help="few-shot examples per prompt")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True)  # fmt: skip
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--registry", "registry_path", type=click.Path(path_type=Path), help="registry for NAME:TAG refs"
)
@click.option("--json", "as_json", is_flag=True, help="machine-readable results on stdout")
def eval_harness(base, deltas, tasks, include_paths, with_base, limit, num_fewshot, batch_size, dtype, device,
                 registry_path, as_json) -> None:  # fmt: skip
    """Run harness --tasks on base + each of DELTAS (delta dirs or registry NAME:TAG), built in memory."""
    try:
        from deltakit.eval.harness import run_harness
    except ImportError:
        raise click.UsageError("eval-harness needs lm-eval: pip install 'deltakit-llm[harness]'") from None
    if not deltas and not with_base:
        raise click.UsageError("give at least one DELTA, or --with-base")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    from deltakit.refs import resolve_base_dir, resolve_delta_dir

    base_dir = resolve_base_dir(base, registry_path)
    limit_value = int(limit) if limit is not None and limit >= 1 else limit
    rows = []
    for delta in ([None] if with_base else []) + list(deltas):
        delta_dir = resolve_delta_dir(delta, registry_path) if delta else None
        if not as_json:
            err_console.print(f"evaluating {delta or 'base'} on {', '.join(names)}", highlight=False)
        out = run_harness(
            base_dir,
            delta_dir,
            names,
            include_path=list(include_paths),
            limit=limit_value,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            dtype=dtype,
            device=device,
        )
        rows.append({"delta": delta, "tasks": _metrics(out)})
    if as_json:
        emit_json({"base": base, "tasks": names, "results": rows})
    else:
        out_console.print(_table(rows))
