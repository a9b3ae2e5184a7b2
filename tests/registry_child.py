"""Test-only entry for the registry crash tests: run pushes or gc in a child process.

usage: python registry_child.py push ROOT PAUSE DELTA REF [DELTA REF ...]
       python registry_child.py gc ROOT SECONDS

PAUSE is ``-`` or ``point:seconds[,point:seconds]`` (points ``blob``, ``ref``); it is installed as the
registry's injected pause hook, so a test can kill the child inside each write window.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from deltakit.registry import Registry


def pause_hook(spec: str) -> Callable[[str], None] | None:
    """A hook that sleeps at the named points, parsed from ``blob:0.05,ref:1`` (None for ``-``)."""
    if spec in ("", "-"):
        return None
    delays = {}
    for item in spec.split(","):
        point, _, seconds = item.partition(":")
        delays[point] = float(seconds)

    def hook(point: str) -> None:
        if point in delays:
            time.sleep(delays[point])

    return hook


def main(argv: list[str]) -> None:
    """Run the command in ``argv`` (see the module docstring)."""
    command, root = argv[0], argv[1]
    if command == "push":
        reg = Registry.open(root, pause_hook=pause_hook(argv[2]))
        print("ready", flush=True)
        for delta, ref in zip(argv[3::2], argv[4::2], strict=True):
            reg.push(delta, ref)
        print("done", flush=True)
    elif command == "gc":
        reg = Registry.open(root)
        end = time.time() + float(argv[2])
        n = 0
        while time.time() < end:
            reg.gc()
            n += 1
        print("gc runs", n, flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
