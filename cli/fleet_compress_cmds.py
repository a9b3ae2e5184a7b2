"""``deltakit compress-fleet``: many fine-tunes against one base into the registry, in parallel.

Exit codes: 0 when every fine-tune was pushed or skipped, 1 when any failed (each one listed), 2 on bad
arguments; the other fine-tunes' deltas are pushed either way.
"""

from __future__ import annotations

from pathlib import Path

import click

from deltakit_cli.common import emit_json, err_console, human_bytes, out_console, parse_ratio, parse_sets


def _progress_line(result, done: int, total: int) -> None:
    colour = {"pushed": "green", "skipped": "cyan", "failed": "red"}[result.status]
    detail = result.error if result.status == "failed" else human_bytes(result.stored_bytes)
    err_console.print(
        f"[{done}/{total}] [{colour}]{result.status}[/] {result.ref} · {detail} · {result.seconds:.1f}s",
        highlight=False,
    )


def _summary(report) -> None:
    counts = ", ".join(f"{report.count(s)} {s}" for s in ("pushed", "skipped", "failed"))
    how = f"{report.executor} × {report.workers} worker(s), {report.threads} thread(s) each"
    out_console.print(f"{counts} · {how} · {report.wall_s:.1f}s", highlight=False)
    for r in report.results:
        if r.status == "failed":
            out_console.print(f"  [red]failed[/] {r.ref}: {r.error}", highlight=False)


@click.command("compress-fleet")
@click.argument("finetunes", nargs=-1, type=click.Path(path_type=Path))
@click.option("--base", help="base checkpoint dir or registered base name (or give it in --spec)")
@click.option("--spec", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON/YAML file with base, finetunes [{name, path}], method, ratio, tag")  # fmt: skip
@click.option("--method", "-m", help="codec name (see `deltakit methods`) [default: the spec's, else dqrelo]")
@click.option("--ratio", help="size as a fraction of the fp16 delta, e.g. 1/8 or 0.125")
@click.option("--rank", type=int, help="fixed rank for low-rank codecs (instead of --ratio)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="codec config field (repeatable)")
@click.option("--tag", help="registry tag of every delta, NAME:TAG [default: the spec's, else latest]")
@click.option("--registry", "registry_path", type=click.Path(path_type=Path), help="registry directory")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="parallel tasks")
@click.option(
    "--threads", type=click.IntRange(min=1), help="torch threads per worker [default: cpus // workers]"
)
@click.option(
    "--ray", "use_ray", is_flag=True, help="run the tasks on Ray (a local cluster unless --ray-address)"
)
@click.option("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto); implies --ray")
@click.option("--inline", is_flag=True, help="run the tasks one after another in this process")
@click.option("--overwrite", is_flag=True, help="recompress a NAME:TAG that exists from another base")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable report on stdout")
def compress_fleet(finetunes, base, spec, method, ratio, rank, sets, tag, registry_path, workers, threads,
                   use_ray, ray_address, inline, overwrite, seed, as_json) -> None:  # fmt: skip
    """Compress every fine-tune directory FINETUNES (or the --spec list) against --base into the registry.

    Each delta is pushed as DIRNAME:TAG as soon as its task finishes; fine-tunes already in the registry
    with the same base are skipped, so rerunning an interrupted run resumes it.
    """
    from deltakit.jobs.fleet_compress import FleetError, FleetOptions, compress_fleet, plan_items

    given: dict = {}
    if spec is not None:
        from deltakit.jobs.fleet_spec import load_spec

        parsed = load_spec(spec)
        given, items = dict(parsed.options), list(parsed.items)
        base = base or parsed.base
        items += plan_items(finetunes) if finetunes else []
    else:
        items = plan_items(finetunes)
    if not base or not items:
        raise click.UsageError("give --base and at least one fine-tune directory (or a --spec with both)")
    if use_ray and inline:
        raise click.UsageError("give --ray or --inline, not both")
    ratio_value = parse_ratio(ratio)
    if ratio_value is not None or rank is not None:
        given.pop("ratio", None), given.pop("rank", None)
    options = FleetOptions(
        method=method or given.get("method", "dqrelo"),
        ratio=ratio_value if ratio_value is not None else given.get("ratio"),
        rank=rank if rank is not None else given.get("rank"),
        overrides={**given.get("overrides", {}), **parse_sets(sets)},
        seed=seed, tag=tag or given.get("tag", "latest"), workers=workers, threads=threads,
        executor="ray" if (use_ray or ray_address) else "inline" if inline else "process",
        ray_address=ray_address, overwrite=overwrite,
    )  # fmt: skip
    from deltakit.registry import Registry, validate_tag

    validate_tag(options.tag)
    with Registry.open(registry_path) as reg:
        report = compress_fleet(base, items, reg, options, progress=None if as_json else _progress_line)
    if as_json:
        emit_json(report.to_dict())
    else:
        _summary(report)
    if not report.ok:
        failed = [r.ref for r in report.results if r.status == "failed"]
        raise FleetError(f"{len(failed)} of {len(report.results)} fine-tune(s) failed: {', '.join(failed)}")
