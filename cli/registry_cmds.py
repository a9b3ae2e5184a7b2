"""``deltakit registry ...``: thin click commands over :class:`deltakit.registry.Registry`.

Every command takes ``--registry PATH`` (default: ``$DELTAKIT_HOME/registry`` or the user data dir)
and ``--json`` (a stable machine-readable result on stdout). Errors are deltakit errors; the main CLI
prints them as one line and exits with their code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from deltakit_cli.common import emit_json, err_console, human_bytes, out_console

_REGISTRY_OPT = click.option(
    "--registry", "registry_path", type=click.Path(path_type=Path),
    help="registry directory (default: $DELTAKIT_HOME/registry or the user data dir)",
)  # fmt: skip
_JSON_OPT = click.option("--json", "as_json", is_flag=True, help="machine-readable output on stdout")
_REMOTE_OPTS = (
    click.argument("url", metavar="s3://BUCKET/PREFIX"),
    click.option("--endpoint-url", help="S3 endpoint (default: $DELTAKIT_S3_ENDPOINT / $AWS_ENDPOINT_URL / AWS)"),
    click.option("--ref", "refs", multiple=True, metavar="NAME[:TAG]",
                 help="only this delta (a bare NAME means all its tags; repeatable)"),
    click.option("--base", "bases", multiple=True, metavar="NAME", help="only this base (repeatable)"),
    click.option("--workers", type=int, default=4, show_default=True, help="parallel blob transfers"),
)  # fmt: skip


def _lit(value: object) -> str:
    """``value`` as text that rich prints literally (names, paths and manifest fields are not markup)."""
    return escape(str(value))


def _cells(*values: object) -> list[Text]:
    """Table cells that rich prints literally."""
    return [Text(str(v)) for v in values]


def _common(func: Any) -> Any:
    return _REGISTRY_OPT(_JSON_OPT(func))


def _remote(func: Any) -> Any:
    for opt in reversed(_REMOTE_OPTS):
        func = opt(func)
    return _common(func)


def _open(path: Path | None, create: bool = False) -> Any:
    from deltakit.errors import NotFoundError
    from deltakit.registry import Registry, default_registry_path
    from deltakit.registry.layout import LAYOUT_FILE

    root = path.expanduser() if path is not None else default_registry_path()
    if not create and not (root / LAYOUT_FILE).is_file():
        raise NotFoundError(f"no registry at {root}; run `deltakit registry init` first")
    return Registry.open(root, create=create)


def _delta_table(infos: list[Any]) -> Table:
    table = Table(show_edge=False)
    for column in ("delta", "codec", "ratio", "stored", "base", "target", "eval", "created"):
        table.add_column(column, justify="right" if column in ("ratio", "stored") else "left")
    for d in infos:
        evals = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (d.eval or {}).items()
        )
        table.add_row(
            *_cells(d.ref, d.codec or "?", f"{d.ratio:.4f}" if d.ratio else "-", human_bytes(d.stored_bytes),
                    d.base_name or "?", d.target_name or "?", evals, d.created_at)
        )  # fmt: skip
    return table


@click.group()
def registry() -> None:
    """The registry: one base plus many deltas, content-addressed (embedded; S3 to scale out)."""


@registry.command()
@_common
def init(registry_path: Path | None, as_json: bool) -> None:
    """Create an empty registry (idempotent)."""
    reg = _open(registry_path, create=True)
    if as_json:
        emit_json({"registry": str(reg.root)})
    else:
        out_console.print(f"[green]registry[/] {_lit(reg.root)}")


@registry.command("add-base")
@click.argument("name")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fingerprint", help="the checkpoint's sha256:... fingerprint (computed when omitted)")
@click.option("--replace", is_flag=True, help="re-point an existing base name at different weights")
@click.option("--force", is_flag=True, help="with --replace: even if deltas use the old weights")
@_common
def add_base(name, model_dir, fingerprint, replace, force, registry_path, as_json) -> None:
    """Store the checkpoint MODEL_DIR as base NAME."""
    reg = _open(registry_path, create=True)
    with (
        err_console.status(f"adding base {_lit(name)}", spinner="dots")
        if not as_json
        else contextlib.nullcontext()
    ):
        info = reg.add_base(name, model_dir, fingerprint=fingerprint, replace=replace, force=force)
    if as_json:
        emit_json(info.to_dict())
    else:
        out_console.print(
            f"[green]base[/] {_lit(info.name)}: {info.n_files} files, {human_bytes(info.total_bytes)}, "
            f"{_lit(info.fingerprint)}"
        )


@registry.command()
@click.argument("delta_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("ref", metavar="NAME[:TAG]")
@click.option("--check-base", is_flag=True, help="refuse a delta whose base is not registered here")
@_common
def push(delta_dir, ref, check_base, registry_path, as_json) -> None:
    """Store the delta directory DELTA_DIR as NAME[:TAG] (tag defaults to latest)."""
    reg = _open(registry_path, create=True)
    info = reg.push(delta_dir, ref, check_base=check_base)
    if as_json:
        emit_json(info.to_dict())
    else:
        out_console.print(
            f"[green]pushed[/] {_lit(info.ref)}: {info.n_files} files, {human_bytes(info.total_bytes)}"
        )


@registry.command("ls")
@click.option("--base", help="only deltas made from this base")
@click.option("--bases", "list_bases", is_flag=True, help="list the registered bases instead")
@_common
def ls_cmd(base, list_bases, registry_path, as_json) -> None:
    """List deltas (or bases with --bases)."""
    reg = _open(registry_path)
    if list_bases:
        rows = reg.bases()
        if as_json:
            emit_json([b.to_dict() for b in rows])
            return
        table = Table(show_edge=False)
        for column in ("base", "files", "size", "fingerprint"):
            table.add_column(column)
        for b in rows:
            table.add_row(*_cells(b.name, b.n_files, human_bytes(b.total_bytes), b.fingerprint))
        out_console.print(table)
        return
    infos = reg.ls(base=base)
    if as_json:
        emit_json([d.to_dict() for d in infos])
    elif not infos:
        err_console.print("no deltas" + (f" of base {_lit(base)}" if base else ""))
    else:
        out_console.print(_delta_table(infos))


@registry.command()
@click.argument("ref", metavar="NAME[:TAG]")
@_common
def show(ref, registry_path, as_json) -> None:
    """Everything about one delta: codec, sizes, lineage, files, evals."""
    info = _open(registry_path).show(ref)
    if as_json:
        emit_json(info)
        return
    lines = [
        f"codec  {info['codec']} v{info['codec_version']}  config {info['codec_config']}",
        f"budget {info['budget']}  ratio {info['ratio']}",
        f"base   {info['base_name']}  {info['base_fingerprint']}"
        + (f" (registered as {info['registered_base']})" if info["registered_base"] else " (not registered)"),
        f"target {info['target_name']}  {info['target_fingerprint']}",
        f"size   {human_bytes(info['total_bytes'])} in {info['n_files']} files + manifest",
    ]
    if info["also_tagged_as"]:
        lines.append(f"same content as {', '.join(info['also_tagged_as'])}")
    if info["eval"]:
        lines.append(f"eval   {info['eval']}")
    out_console.print(f"[bold]{_lit(info['ref'])}[/]  manifest {_lit(info['manifest'])}")
    for line in lines:
        out_console.print(line, markup=False, highlight=False)


@registry.command()
@click.argument("ref", metavar="NAME[:TAG]")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="directory to write")
@click.option("--overwrite", is_flag=True, help="replace an existing output directory")
@_common
def pull(ref, output, overwrite, registry_path, as_json) -> None:
    """Write delta NAME[:TAG] as a directory (every file hash-checked)."""
    path = _open(registry_path).pull(ref, output, overwrite=overwrite)
    if as_json:
        emit_json({"ref": ref, "path": str(path)})
    else:
        out_console.print(f"[green]pulled[/] {_lit(ref)} -> {_lit(path)}")


@registry.command()
@click.argument("ref", metavar="NAME[:TAG] | --base NAME")
@click.option("--base", "is_base", is_flag=True, help="REF names a base model instead of a delta")
@click.option("--force", is_flag=True, help="remove a base even though deltas still use it")
@_common
def rm(ref, is_base, force, registry_path, as_json) -> None:
    """Remove a delta tag (or a base with --base); blobs are freed by gc."""
    reg = _open(registry_path)
    info = reg.rm_base(ref, force=force) if is_base else reg.rm(ref)
    if as_json:
        emit_json({"removed": info.to_dict()})
    else:
        out_console.print(
            f"[green]removed[/] {_lit('base ' + info.name if is_base else info.ref)}; run gc to free space"
        )


@registry.command()
@click.option("--dry-run", is_flag=True, help="report what would be removed")
@_common
def gc(dry_run, registry_path, as_json) -> None:
    """Delete blobs that no delta or base needs, stale caches and temp files."""
    report = _open(registry_path).gc(dry_run=dry_run)
    if as_json:
        emit_json(report.to_dict())
    else:
        verb = "would free" if dry_run else "freed"
        out_console.print(
            f"{verb} {human_bytes(report.freed_bytes)} in {report.removed_blobs} blobs; "
            f"{report.removed_cache_dirs} cache dirs, {report.removed_temp_files} temp files"
        )


@registry.command()
@click.option("--quick", is_flag=True, help="check sizes only, do not re-hash every blob")
@click.option("--rebuild-catalog", is_flag=True, help="recreate the SQLite catalog from refs first")
@_common
def verify(quick, rebuild_catalog, registry_path, as_json) -> None:
    """Check every blob's hash and every reference; exit 4 if anything is wrong."""
    from deltakit.errors import IntegrityError

    reg = _open(registry_path)
    if rebuild_catalog:
        reg.rebuild_catalog()
    with err_console.status("verifying", spinner="dots") if not as_json else contextlib.nullcontext():
        report = reg.verify(deep=not quick)
    if as_json:
        emit_json(report.to_dict())
    else:
        for problem in report.problems:
            err_console.print(f"[red]{_lit(problem)}[/]", highlight=False)
        out_console.print(
            f"{report.blobs_checked} blobs ({human_bytes(report.bytes_checked)}) and {report.refs_checked} refs "
            f"checked; {report.unreferenced_blobs} unreferenced blobs, {report.temp_files} temp files"
        )
    if not report.ok:
        raise IntegrityError(f"{len(report.problems)} problem(s) in registry {reg.root}")


@registry.command("set-eval")
@click.argument("ref", metavar="NAME[:TAG]")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@click.option("--replace", is_flag=True, help="drop earlier results instead of merging")
@_common
def set_eval(ref, pairs, replace, registry_path, as_json) -> None:
    """Record eval results (numbers where they parse as numbers) for a delta."""
    results: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: expected KEY=VALUE")
        try:
            results[key] = int(value)
        except ValueError:
            try:
                results[key] = float(value)
            except ValueError:
                results[key] = value
    stored = _open(registry_path).set_eval(ref, results, replace=replace)
    if as_json:
        emit_json(stored)
    else:
        out_console.print(f"[green]eval[/] {_lit(ref)}: {_lit(stored)}")


def _sync_output(report: Any, as_json: bool) -> None:
    if as_json:
        emit_json(report.to_dict())
        return
    mb = report.bytes_sent / 1e6
    rate = mb / report.seconds if report.seconds else 0.0
    out_console.print(
        f"{report.direction} {_lit(report.remote)}: {report.blobs_sent} blobs sent ({mb:.1f} MB, {rate:.1f} MB/s), "
        f"{report.blobs_present} already there; {len(report.refs_written)} refs new, "
        f"{len(report.refs_replaced)} replaced"
    )


@registry.command("push-remote")
@_remote
def push_remote(url, endpoint_url, refs, bases, workers, registry_path, as_json) -> None:
    """Send deltas and bases to s3://BUCKET/PREFIX (only blobs it lacks; everything if none selected)."""
    reg = _open(registry_path)
    report = reg.push_remote(
        url, refs=refs or None, bases=bases or None, workers=workers, endpoint_url=endpoint_url
    )
    _sync_output(report, as_json)


@registry.command("pull-remote")
@_remote
def pull_remote(url, endpoint_url, refs, bases, workers, registry_path, as_json) -> None:
    """Fetch deltas and bases from s3://BUCKET/PREFIX (only blobs missing here, hash-checked)."""
    reg = _open(registry_path, create=True)
    report = reg.pull_remote(
        url, refs=refs or None, bases=bases or None, workers=workers, endpoint_url=endpoint_url
    )
    _sync_output(report, as_json)
