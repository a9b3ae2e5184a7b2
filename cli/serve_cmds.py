"""``deltakit serve``: an OpenAI-compatible server over one resident base and many deltas."""

from __future__ import annotations

import os
from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape

from deltakit_cli.common import err_console

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kb": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mb": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gb": 1 << 30,
    "gib": 1 << 30,
}


def parse_bytes(value: str) -> int:
    """``512M``, ``2GiB``, ``1048576`` -> bytes."""
    text = value.strip().lower()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = text[len(number) :].strip()
    try:
        return int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        raise click.BadParameter(f"{value!r} is not a size (write 512M, 2G or a number of bytes)") from None


def parse_deltas(items: tuple[str, ...]) -> dict[str, str]:
    """``("chat=out/chat",)`` -> ``{"chat": "out/chat"}``; a bare ``REF`` (registry) is named after itself."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep:
            name, source = item, item
        if not name or not source:
            raise click.BadParameter(f"--delta {item!r}: expected NAME=DIR or a registry ref")
        if name in out:
            raise click.BadParameter(f"--delta: the name {name!r} is given twice")
        out[name] = source
    return out


@click.command()
@click.argument("base")
@click.option(
    "--registry",
    "registry_path",
    type=click.Path(path_type=Path),
    help="registry directory (BASE may then be a registry base name; its deltas are served)",
)
@click.option(
    "--delta",
    "deltas",
    multiple=True,
    metavar="NAME=DIR|REF",
    help="serve a delta directory (or registry ref) under NAME (repeatable)",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="DELTAKIT_API_KEY",
    help="require 'Authorization: Bearer KEY'; prefer the env variable DELTAKIT_API_KEY (a key on the "
    "command line is visible to every local user)",
)
@click.option(
    "--allow-path",
    "allow_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="directory load_lora_adapter may read deltas from (repeatable; default: the registry and the "
    "--delta directories)",
)
@click.option(
    "--max-body", default="1M", show_default=True, help="largest request body accepted (larger: 413)"
)
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(min=1),
    default=8192,
    show_default=True,
    help="longest prompt accepted, in tokens (longer: 400)",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16 or float16")
@click.option("--host-cache", default="4G", show_default=True, help="host memory for compressed deltas")
@click.option("--device-cache", default="2G", show_default=True, help="device memory for compressed deltas")
@click.option("--max-batch", type=int, default=8, show_default=True, help="requests per forward batch")
@click.option("--no-registry-deltas", is_flag=True, help="with --registry, serve only the --delta ones")
def serve(
    base,
    registry_path,
    deltas,
    host,
    port,
    api_key,
    allow_paths,
    max_body,
    max_prompt_tokens,
    device,
    dtype,
    host_cache,
    device_cache,
    max_batch,
    no_registry_deltas,
):
    """Serve BASE (a model directory or a registry base name) and its deltas over an OpenAI-style API.

    Requests pick a delta with "model": a --delta NAME, a registry "name[:tag]", or the base's name.
    Adapters can be added at run time with POST /v1/load_lora_adapter {"lora_name", "lora_path"}.
    """
    try:
        import uvicorn

        from deltakit.runtime.engine import ServingEngine
        from deltakit.runtime.server import ServerLimits, create_app
    except ModuleNotFoundError as exc:
        raise click.ClickException(f"deltakit serve needs {exc.name}: pip install fastapi uvicorn") from None

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ctx = click.get_current_context()
    if api_key is not None and ctx.get_parameter_source("api_key") == ParameterSource.COMMANDLINE:
        err_console.print(
            "[yellow]warning:[/] --api-key on the command line is visible to every local user (ps); "
            "set DELTAKIT_API_KEY instead",
            highlight=False,
        )
    err_console.print(f"loading base {escape(str(base))} on {escape(device)} ...", highlight=False)
    engine = ServingEngine.from_base(
        base,
        registry_path=registry_path,
        deltas=parse_deltas(deltas),
        device=device,
        dtype=dtype,
        host_cache_bytes=parse_bytes(host_cache),
        device_cache_bytes=parse_bytes(device_cache),
        max_batch=max_batch,
        use_registry=registry_path is not None and not no_registry_deltas,
        allowed_roots=list(allow_paths) or None,
        max_prompt_tokens=max_prompt_tokens,
    )
    names = ", ".join(engine.runtime.names()) or "(none)"
    err_console.print(
        escape(f"base {engine.base_name} ({engine.runtime.fingerprint[:19]}…); deltas: {names}"),
        highlight=False,
    )
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        err_console.print(
            "[yellow]warning:[/] serving on a public address without --api-key", highlight=False
        )
    app = create_app(engine, api_key=api_key, limits=ServerLimits(max_body_bytes=parse_bytes(max_body)))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        engine.close()
