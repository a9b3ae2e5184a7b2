"""``deltakit registry ...`` commands: JSON output, errors as deltakit errors with exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))

from registry_helpers import BASE_FP, flip_byte, make_base, make_delta  # noqa: E402

from deltakit.errors import IntegrityError, RegistryError, UsageError  # noqa: E402
from deltakit_cli.registry_cmds import registry  # noqa: E402


def _run(*args: str) -> dict | list:
    result = CliRunner().invoke(registry, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_flow(tmp_path: Path) -> None:
    r = str(tmp_path / "reg")
    assert _run("init", "--registry", r)["registry"] == r
    base = _run(
        "add-base", "tiny-base", str(make_base(tmp_path / "base")), "--fingerprint", BASE_FP, "--registry", r
    )
    assert base["n_files"] == 3
    pushed = _run("push", str(make_delta(tmp_path / "d")), "chat:v1", "--registry", r)
    assert pushed["ref"] == "chat:v1" and pushed["codec"] == "dqrelo"
    assert [d["ref"] for d in _run("ls", "--registry", r)] == ["chat:v1"]
    assert [d["ref"] for d in _run("ls", "--base", "tiny-base", "--registry", r)] == ["chat:v1"]
    assert [b["name"] for b in _run("ls", "--bases", "--registry", r)] == ["tiny-base"]
    assert _run("set-eval", "chat:v1", "ppl=7.5", "task=qa", "--registry", r) == {"ppl": 7.5, "task": "qa"}
    shown = _run("show", "chat:v1", "--registry", r)
    assert shown["registered_base"] == "tiny-base" and shown["eval"]["ppl"] == 7.5
    assert Path(_run("pull", "chat:v1", "-o", str(tmp_path / "out"), "--registry", r)["path"]).is_dir()
    assert _run("verify", "--registry", r)["ok"] is True
    with pytest.raises(RegistryError):
        CliRunner().invoke(registry, ["rm", "--base", "tiny-base", "--registry", r], catch_exceptions=False)
    assert _run("rm", "chat:v1", "--registry", r)["removed"]["ref"] == "chat:v1"
    assert _run("gc", "--registry", r)["removed_blobs"] == 2
    # human-readable output works too
    result = CliRunner().invoke(registry, ["ls", "--bases", "--registry", r], catch_exceptions=False)
    assert result.exit_code == 0 and "tiny-base" in result.output


def test_cli_errors_map_to_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltakit_cli.main import main

    r = str(tmp_path / "reg")
    delta = make_delta(tmp_path / "d")
    with pytest.raises(SystemExit) as exc:
        main(["registry", "push", str(delta), "../evil", "--registry", r])
    assert exc.value.code == UsageError.exit_code
    main_ok = ["registry", "push", str(delta), "chat", "--registry", r]
    main(main_ok)
    blob = next(
        p for p in (tmp_path / "reg" / "blobs").rglob("*") if p.is_file() and p.stat().st_size == 4096
    )
    flip_byte(blob)
    with pytest.raises(SystemExit) as exc:
        main(["registry", "verify", "--registry", r])
    assert exc.value.code == IntegrityError.exit_code
    assert "corrupt-blob" in capsys.readouterr().err
