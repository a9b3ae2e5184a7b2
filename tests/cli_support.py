"""Running the command line inside a test: exit code and captured output, never a raised SystemExit."""

from __future__ import annotations

from deltakit_cli.main import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``deltakit ARGV``; returns (exit code, stdout, stderr) as captured by pytest's ``capsys``."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
