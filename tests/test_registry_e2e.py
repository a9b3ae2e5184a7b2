"""The whole command-line flow: init → add-base → compress --to → ls → apply NAME:TAG → push to S3 →
pull on a fresh registry → apply gives the same bytes."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest_s3 import S3Server, s3_server  # noqa: E402,F401

from deltakit_cli.main import main  # noqa: E402

pytest.importorskip("s3fs", reason="remote registry tests need s3fs: pip install s3fs")


def run(capsys, *argv: str) -> dict | list | None:
    try:
        main(list(argv))
    except SystemExit as exc:
        captured = capsys.readouterr()
        raise AssertionError(f"deltakit {' '.join(argv)} exited {exc.code}: {captured.err}") from None
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv else None


def weights(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob("*.safetensors"))}


def test_cli_flow_through_s3(llama_pair, tmp_path: Path, s3_server: S3Server, capsys, monkeypatch) -> None:  # noqa: F811
    base, ft = llama_pair
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    url = f"s3://deltakit-test/{uuid.uuid4().hex[:8]}"
    endpoint = s3_server.endpoint_url

    run(capsys, "registry", "init", "--registry", one)
    run(capsys, "registry", "add-base", "tiny-llama", str(base), "--registry", one)
    run(
        capsys, "compress", "-m", "dqrelo", "--base", str(base), str(ft), "--to", "chat:v1", "--registry", one
    )
    listed = run(capsys, "registry", "ls", "--registry", one, "--json")
    assert "chat:v1" in json.dumps(listed)
    run(capsys, "apply", str(base), "chat:v1", "-o", str(tmp_path / "out1"), "--registry", one)

    run(capsys, "registry", "push-remote", url, "--endpoint-url", endpoint, "--registry", one)
    run(capsys, "registry", "init", "--registry", two)
    run(capsys, "registry", "pull-remote", url, "--endpoint-url", endpoint, "--registry", two)
    run(capsys, "apply", str(base), "chat:v1", "-o", str(tmp_path / "out2"), "--registry", two)

    first, second = weights(tmp_path / "out1"), weights(tmp_path / "out2")
    assert first and first == second
    report = run(capsys, "registry", "verify", "--registry", two, "--json")
    assert report["ok"] is True
