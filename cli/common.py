"""Shared pieces of the command line: consoles, progress bars, JSON output, argument parsing."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

#: progress and messages go to stderr so stdout stays clean for --json
err_console = Console(stderr=True, soft_wrap=True)
#: tables keep their columns readable when stdout is a pipe or a file (rich assumes 80 columns there)
out_console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)


def emit_json(data: Any) -> None:
    """Write ``data`` as JSON on stdout (the stable machine-readable output of ``--json``)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def parse_ratio(value: str | None) -> float | None:
    """``1/8`` or ``0.125`` -> 0.125."""
    if value is None:
        return None
    from deltakit.codecs.base import parse_fraction

    try:
        return parse_fraction(value)
    except (ValueError, ZeroDivisionError):
        raise click.BadParameter(f"{value!r} is not a ratio (write 0.125 or 1/8)") from None


def parse_sets(items: tuple[str, ...]) -> dict[str, str]:
    """``("rank=4", "mode=random")`` -> ``{"rank": "4", "mode": "random"}``."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise click.BadParameter(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


@contextlib.contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator:
    """Yield a ``callback(done, total, name)`` that drives a rich progress bar on stderr."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),  # description escaped below: names are not markup
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}", style="dim", markup=False),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(escape(description), total=None, item="")

        def update(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, item=name[-60:])

        yield update


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


#: library messages name Python parameters; the CLI shows the flag that sets each one
_PARAMETER_FLAGS = (
    (re.compile(r"\b(force|overwrite)=True\b"), r"--\1"),
    (re.compile(r"\bmodules_to_save=True\b"), "--modules-to-save"),
    (re.compile(r"\brefine_scales=True\b"), "--refine-scales"),
    (re.compile(r"\bweight_allocation=True\b"), "--weight-allocation"),
    (re.compile(r"\brefine_(steps|lr|batch)=(?=[\w.<-])"), r"--refine-\1 "),
    (re.compile(r"\brefine_(steps|lr|batch)=(?![\w.<-])"), r"--refine-\1"),
    (re.compile(r"\bfold_rank="), "--fold-rank R"),
    (re.compile(r"\b(bits_per_weight|size)="), lambda m: "--" + m.group(1).replace("_", "-")),
    (re.compile(r"\bdata=\[([A-Z_]+)\]"), r"--data \1"),
    (re.compile(r"\bbase=([A-Z_]+)"), r"--base \1"),
    (re.compile(r"\boverrides\[(\w+)\]"), r"--set \1"),
    (re.compile(r"\boverrides key\b"), "--set key"),
    (re.compile(r"\b(reduction|tokens|device|steps)=(?=[\w.<])"), r"--\1 "),
    (re.compile(r"\b(reduction|tokens|device|steps)=(?![\w.<])"), r"--\1"),
)


def parameters_as_flags(message: str) -> str:
    """``"pass force=True"`` -> ``"pass --force"``: a library message as the CLI user reads it."""
    for pattern, flag in _PARAMETER_FLAGS:
        message = pattern.sub(flag, message)
    return message
