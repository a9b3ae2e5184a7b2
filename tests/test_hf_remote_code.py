"""Compressed-model directories (lillama, deltallm) load through transformers with trust_remote_code=True.

The shipped modeling file must give the same logits as ``deltakit.load_model``, keep the model small (low-rank
and shared modules, no dense stand-ins), load every stored tensor by name, work without deltakit installed,
and a load without trust_remote_code must still refuse.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lillama_helpers import make_llama, write_text
from safetensors.torch import save_file

import deltakit
from deltakit.compressors.hf_config import MODELING_DIR, PLAN_KEY, load_config, plain_config_dict

COMPRESSORS = ("lillama", "deltallm")
MODULE_CLASS = {"lillama": "LowRankLinear", "deltallm": "SharedDeltaLinear"}
OVERRIDES = {
    "lillama": ({"rank_step": "8", "batch_size": "4", "distill": "false"}, 0.2),
    "deltallm": ({"batch_size": "4", "train": "false", "rank": "4", "share": "both"}, None),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """A 6-block tiny Llama and one compressed directory per compressor (no training: fast)."""
    root = tmp_path_factory.mktemp("hf_remote")
    base = make_llama(root / "base", layers=6)
    text = write_text(root / "cal.txt", 40)
    out = {"base": base}
    for name in COMPRESSORS:
        overrides, reduction = OVERRIDES[name]
        out[name] = root / name
        deltakit.compress_model(
            base, out[name], method=name, data=[text], tokens=512, seq_len=32, reduction=reduction,
            overrides=overrides,
        )  # fmt: skip
    return out


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))  # (batch, seq)


def _remote_load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(path), trust_remote_code=True, output_loading_info=True, dtype=torch.float32
    )


@pytest.mark.parametrize("name", COMPRESSORS)
def test_remote_code_load_equals_load_model_and_stays_small(dirs, name):
    from transformers import AutoModelForCausalLM

    model, info = _remote_load(dirs[name])
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and info["error_msgs"] == []
    reference = deltakit.load_model(dirs[name])
    source = AutoModelForCausalLM.from_pretrained(str(dirs["base"]))
    count = sum(p.numel() for p in model.parameters())
    assert count == sum(p.numel() for p in reference.parameters())
    assert count < sum(p.numel() for p in source.parameters())
    replaced = [m for m in model.modules() if type(m).__name__ == MODULE_CLASS[name]]
    assert replaced, f"no {MODULE_CLASS[name]} in the transformers-loaded model"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_ids()).logits, reference(_ids()).logits, atol=1e-5, rtol=0)


def test_deltallm_followers_share_the_anchor_parameter(dirs):
    model, _ = _remote_load(dirs["deltallm"])
    plan = json.loads((dirs["deltallm"] / "config.json").read_text())[PLAN_KEY]
    assert plan["shared"]
    for follower, anchor in plan["shared"]:
        assert model.get_submodule(follower).weight is model.get_submodule(anchor).weight
        assert f"{follower}.weight" not in model.state_dict()


@pytest.mark.parametrize("name", COMPRESSORS)
def test_plain_load_without_trust_remote_code_refuses(dirs, name):
    from transformers import AutoModelForCausalLM

    config = json.loads((dirs[name] / "config.json").read_text())
    assert config["model_type"] == f"deltakit_{name}"
    assert (
        (dirs[name] / config["auto_map"]["AutoModelForCausalLM"].split(".")[0]).with_suffix(".py").is_file()
    )
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(str(dirs[name]))


@pytest.mark.parametrize("name", COMPRESSORS)
def test_modeling_file_imports_only_torch_and_transformers(name):
    tree = ast.parse((MODELING_DIR / f"modeling_deltakit_{name}.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    assert roots - {"__future__", "shutil", "pathlib", "typing"} == {"torch", "transformers"}


@pytest.mark.parametrize("name", COMPRESSORS)
def test_loads_with_deltakit_unimportable(dirs, name, tmp_path):
    """A user with transformers but no deltakit: the directory loads and gives deltakit's logits."""
    with torch.no_grad():
        expected = deltakit.load_model(dirs[name])(_ids()).logits
    save_file({"ids": _ids(), "logits": expected}, str(tmp_path / "expected.safetensors"))
    script = textwrap.dedent(f"""
        import sys
        sys.modules["deltakit"] = None  # any import of deltakit now raises ImportError
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        data = load_file({str(tmp_path / "expected.safetensors")!r})
        model = AutoModelForCausalLM.from_pretrained({str(dirs[name])!r}, trust_remote_code=True,
                                                     dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(data["ids"]).logits
        torch.testing.assert_close(logits, data["logits"], atol=1e-5, rtol=0)
        assert not any(m == "deltakit" or m.startswith("deltakit.") for m in sys.modules if sys.modules[m])
        print("OK", type(model).__name__)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    prefix = {"lillama": "DeltakitLillama", "deltallm": "DeltakitDeltaLLM"}[name]
    assert f"OK {prefix}LlamaForCausalLM" in result.stdout


@pytest.mark.parametrize("name", COMPRESSORS)
def test_transformers_save_pretrained_keeps_it_sealed(dirs, name, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = _remote_load(dirs[name])
    model.save_pretrained(str(tmp_path / "resaved"))
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["model_type"] == f"deltakit_{name}" and "auto_map" in config
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "resaved"))
    again, info = _remote_load(tmp_path / "resaved")
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    with torch.no_grad():
        torch.testing.assert_close(
            again.eval()(_ids()).logits, model.eval()(_ids()).logits, atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("name", COMPRESSORS)
def test_export_is_plain_without_remote_code(dirs, name, tmp_path):
    from transformers import AutoModelForCausalLM

    exported = deltakit.export_model(dirs[name], tmp_path / "plain")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and PLAN_KEY not in config
    assert (
        not list(exported.glob("modeling_*.py")) and not (exported / "model.safetensors.index.json").exists()
    )
    plain = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(_ids()).logits, deltakit.load_model(dirs[name])(_ids()).logits,
                                   atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("name", COMPRESSORS)
def test_directory_without_modeling_file_still_loads_with_deltakit(dirs, name, tmp_path):
    """Directories sealed before the modeling file existed: no auto_map, no plan; load_model still works."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(dirs[name], old)
    (old / f"modeling_deltakit_{name}.py").unlink()
    (old / "model.safetensors.index.json").unlink(missing_ok=True)
    config = json.loads((old / "config.json").read_text())
    del config["auto_map"], config[PLAN_KEY]
    (old / "config.json").write_text(json.dumps(config))
    assert "auto_map" not in plain_config_dict(dirs[name]) and PLAN_KEY not in plain_config_dict(dirs[name])
    assert not hasattr(load_config(dirs[name]), PLAN_KEY)
    with torch.no_grad():
        torch.testing.assert_close(
            deltakit.load_model(old)(_ids()).logits, deltakit.load_model(dirs[name])(_ids()).logits,
            atol=0, rtol=0,
        )  # fmt: skip


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> Path:
    """A tied-embedding Llama and a Qwen2 (q/k/v biases), both 6 blocks, with the byte tokenizer."""
    import transformers as tf
    from lillama_helpers import byte_tokenizer

    root = tmp_path_factory.mktemp("hf_remote_variants")
    make_llama(root / "tied", layers=6, tie=True)
    torch.manual_seed(0)
    config = tf.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    tf.Qwen2ForCausalLM(config).save_pretrained(str(root / "qwen2"))
    byte_tokenizer().save_pretrained(str(root / "qwen2"))
    write_text(root / "cal.txt", 40)
    return root


@pytest.mark.parametrize("source", ["tied", "qwen2"])
@pytest.mark.parametrize("name", COMPRESSORS)
def test_tied_and_biased_sources_load_exactly(variants, source, name):
    overrides, reduction = OVERRIDES[name]
    out = variants / f"{source}-{name}"
    deltakit.compress_model(
        variants / source, out, method=name, data=[variants / "cal.txt"], tokens=512, seq_len=32,
        reduction=reduction, overrides=overrides,
    )  # fmt: skip
    model, info = _remote_load(out)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    reference = deltakit.load_model(out)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
    if source == "tied":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        replaced = [m for m in model.modules() if type(m).__name__ == MODULE_CLASS[name]]
        biases = [m.up.bias if name == "lillama" else m.bias for m in replaced]
        assert any(b is not None for b in biases), "no replaced q/k/v projection kept its bias"
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(_ids()).logits, reference(_ids()).logits, atol=1e-5, rtol=0)


def test_seal_with_a_plan_needs_a_shipped_modeling_file(tmp_path):
    from deltakit.compressors.hf_config import seal
    from deltakit.errors import UsageError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UsageError, match="plan=None"):
        seal(tmp_path, "other", plan={})
    seal(tmp_path, "other")
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "deltakit_other",
        "deltakit_model_type": "llama",
    }
