"""Registry names wherever a directory goes: apply, inspect, verify, export-peft and import-peft."""

from __future__ import annotations

import json

import pytest
import torch
from cli_support import run_cli as run
from fixtures_models import make_pair

import deltakit
from deltakit.errors import NotFoundError, UsageError
from deltakit.refs import resolve_base_dir, resolve_delta_dir
from deltakit.registry import Registry


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A registry holding base ``tiny`` and an svd delta ``chat:v1`` (and the delta's directory)."""
    root = tmp_path_factory.mktemp("refs")
    base, target = make_pair(root, "llama", torch.float32, keep_embeddings=True)
    delta = root / "delta"
    deltakit.compress(base, target, delta, method="svd", rank=4)
    reg = Registry.open(root / "reg")
    reg.add_base("tiny", base)
    reg.push(delta, "chat:v1")
    return {"root": root, "base": base, "delta": delta, "reg": str(root / "reg")}


def test_resolvers_take_dirs_and_names(world):
    assert resolve_delta_dir(world["delta"], world["reg"]) == world["delta"]
    assert (resolve_delta_dir("chat:v1", world["reg"]) / "manifest.json").is_file()
    assert (resolve_base_dir("tiny", world["reg"]) / "config.json").is_file()
    with pytest.raises(NotFoundError, match="neither a delta directory nor a registry ref"):
        resolve_delta_dir("chat:v2", world["reg"])
    with pytest.raises(NotFoundError, match="neither a model directory nor a registry base"):
        resolve_base_dir("no/such/dir", world["reg"])


def test_apply_inspect_verify_with_names(world, tmp_path, capsys):
    reg = world["reg"]
    code, out, err = run(
        capsys, "apply", "tiny", "chat:v1", "-o", str(tmp_path / "a"), "--registry", reg, "--json"
    )
    assert code == 0, err
    code, _, err = run(capsys, "apply", str(world["base"]), str(world["delta"]), "-o", str(tmp_path / "b"))
    assert code == 0, err
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, out, err = run(capsys, "inspect", "chat:v1", "--registry", reg, "--json")
    assert code == 0, err
    assert json.loads(out)["codec"] == "svd"
    code, out, err = run(capsys, "verify", "chat:v1", "--base", "tiny", "--registry", reg, "--json")
    assert code == 0, err
    assert json.loads(out)["base_checked"] is True
    code, _, err = run(capsys, "apply", "nobase", "chat:v1", "-o", str(tmp_path / "c"), "--registry", reg)
    assert code != 0 and "neither a model directory nor a registry base" in err and "Traceback" not in err


def test_peft_commands_with_names(world, tmp_path, capsys):
    pytest.importorskip("peft")
    reg = world["reg"]
    code, out, err = run(
        capsys, "export-peft", "chat:v1", "-o", str(tmp_path / "ad"), "--registry", reg, "--json"
    )
    assert code == UsageError.exit_code, out  # the fixture's norms moved: refused in one line
    assert "cannot hold" in err and "norm" in err and "Traceback" not in err
    assert not (tmp_path / "ad").exists()


def test_import_peft_to_registry_then_export_again(world, tmp_path, capsys):
    """import-peft --to pushes a delta; export-peft of that ref writes an adapter with the same factors."""
    peft = pytest.importorskip("peft")
    from deltakit.eval.delta_model import load_delta_model

    reg = world["reg"]
    model = load_delta_model(world["base"], None)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    wrapped.save_pretrained(str(tmp_path / "adapter"))
    code, out, err = run(capsys, "import-peft", str(tmp_path / "adapter"), "--base", "tiny", "--to", "imp:v1",
                         "--registry", reg, "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["registry"]["name"] == "imp"
    code, out, err = run(capsys, "export-peft", "imp:v1", "-o", str(tmp_path / "back"), "--base", "tiny",
                         "--registry", reg, "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert len(report["lora_modules"]) == 2 and report["kl"] < 1e-6
