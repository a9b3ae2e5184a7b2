"""The ``deltakit`` command: a click group over deltakit's public API.

Errors from deltakit (:class:`deltakit.errors.DeltakitError`) are printed as one line on stderr and
turned into the error's exit code; any other exception escaping a command is one ``error:`` line and
exit code 1 (``DELTAKIT_DEBUG=1`` re-raises it, traceback included). Warnings are printed as
``warning: ...`` lines. Messages are printed literally (never read as rich markup).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click
from rich.markup import escape

from deltakit import __version__
from deltakit.ops.threads import passive_wait_policy, set_threads

passive_wait_policy()  # before torch starts its OpenMP pool: idle threads sleep instead of spinning
from deltakit_cli import core_cmds  # noqa: E402 (after the wait policy)
from deltakit_cli.common import err_console, parameters_as_flags  # noqa: E402

#: optional command modules and the click objects they export (loaded if present)
_PLUGGED = (
    ("deltakit_cli.registry_cmds", "registry"),
    ("deltakit_cli.zoo_cmds", "fleet"),
    ("deltakit_cli.eval_cmds", "eval_command"),
    ("deltakit_cli.serve_cmds", "serve"),
    ("deltakit_cli.demo_cmds", "demo"),
    ("deltakit_cli.fleet_compress_cmds", "compress_fleet"),
    ("deltakit_cli.harness_cmds", "eval_harness"),
    ("deltakit_cli.peft_cmds", "export_peft"),
    ("deltakit_cli.peft_cmds", "import_peft"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltakit")
@click.option(
    "--threads",
    default=None,
    metavar="N",
    help="torch CPU threads (default: the CPUs this process may use that other work leaves free)",
)
def cli(threads: str | None) -> None:
    """deltakit: one base model, many small compressed fine-tune deltas."""
    set_threads(threads)


for command in (
    core_cmds.compress,
    core_cmds.apply,
    core_cmds.inspect,
    core_cmds.verify,
    core_cmds.methods,
    core_cmds.export,
):
    cli.add_command(command)
for module_name, attribute in _PLUGGED:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        continue
    cli.add_command(getattr(module, attribute))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(
        f"[yellow]warning:[/] {escape(_one_line(parameters_as_flags(str(message))))}", highlight=False
    )


def _one_line(text: str) -> str:
    """The message on one line: line breaks (from a library's multi-line error) become spaces."""
    return " ".join(text.split()) if "\n" in text or "\r" in text else text


def _fail(message: str, code: int) -> None:
    err_console.print(f"[red]error:[/] {escape(_one_line(message))}", highlight=False)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, mapping every error to a one-line message and an exit code."""
    from deltakit.errors import DeltakitError

    warnings.showwarning = _show_warning
    try:
        cli.main(args=argv, prog_name="deltakit", standalone_mode=False)
    except DeltakitError as exc:
        _fail(parameters_as_flags(str(exc)), exc.exit_code)
    except click.exceptions.Abort:
        err_console.print("[red]aborted[/]")
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
        _fail(exc.format_message() + hint, exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/]")
        sys.exit(130)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - a Rust panic from safetensors is a BaseException
        if os.environ.get("DELTAKIT_DEBUG") == "1" or isinstance(exc, (GeneratorExit, MemoryError)):
            raise
        detail = str(exc) or type(exc).__name__
        prefix = "" if isinstance(exc, OSError) else f"unexpected {type(exc).__name__}: "
        _fail(prefix + detail, 1)


if __name__ == "__main__":
    main()
