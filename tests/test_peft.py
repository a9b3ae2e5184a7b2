"""PEFT LoRA both ways: export a low-rank delta as an adapter, import an adapter as a delta.

Export: ``PeftModel.from_pretrained(base, adapter)`` gives the logits of deltakit's apply of the same delta.
Import: applying the imported delta gives the logits of PEFT's ``merge_and_unload()``. Tiny fp32 fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures_models import build_model, make_pair, save_model

import deltakit
from deltakit.errors import FormatError, TensorMismatchError, UsageError
from deltakit.eval.delta_model import load_delta_model
from deltakit.interop.peft_export import export_peft
from deltakit.interop.peft_import import import_peft

peft = pytest.importorskip("peft")
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
LINEARS = {"llama": ("q_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "c_fc")}


def _lowrank_pair(root: Path, arch: str, moved: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """fp32 base and a fine-tune that moves some linear weights (and ``moved`` ones) by a rank-3 update."""
    model = build_model(arch)
    base = save_model(model, root / f"{arch}-base", torch.float32)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".weight") and any(f".{m}." in f".{name}" for m in LINEARS[arch] + moved):
                rows, cols = param.shape
                param += 0.05 * torch.randn(rows, 3, generator=gen) @ torch.randn(3, cols, generator=gen)
    return base, save_model(model, root / f"{arch}-ft", torch.float32)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    return _logits(peft.PeftModel.from_pretrained(load_delta_model(base, None), str(adapter)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_loads_in_peft_with_the_delta_logits(tmp_path, arch):
    base, target = _lowrank_pair(tmp_path, arch)
    delta = tmp_path / "delta"
    deltakit.compress(base, target, delta, method="svd", rank=3)
    report = export_peft(delta, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["r"] == config["lora_alpha"] == 3 and set(report.lora_modules.values()) == {3}
    assert len(config["target_modules"]) == len(LINEARS[arch]) * 2  # two layers
    reference = _logits(load_delta_model(base, delta))
    assert not torch.allclose(reference, _logits(load_delta_model(base, None)), atol=1e-3)
    torch.testing.assert_close(_peft_logits(base, tmp_path / "adapter"), reference, atol=1e-4, rtol=1e-4)


def test_export_refuses_norms_and_sign_parts_unless_folded(tmp_path):
    base, target = make_pair(tmp_path, "llama", torch.float32, keep_embeddings=True)
    svd = tmp_path / "svd"
    deltakit.compress(base, target, svd, method="svd", rank=4)
    with pytest.raises(UsageError, match=r"cannot hold \d+ tensor\(s\).*norm"):
        export_peft(svd, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    lr_base, lr_target = _lowrank_pair(tmp_path, "llama")
    dq = tmp_path / "dq"
    deltakit.compress(lr_base, lr_target, dq, method="dqrelo", ratio=0.25)
    with pytest.raises(UsageError, match="fold_rank="):
        export_peft(dq, tmp_path / "b")
    full = export_peft(dq, tmp_path / "full", fold_rank=128)  # full rank: the fold is exact
    assert full.folded and max(full.folded.values()) < 1e-5
    torch.testing.assert_close(
        _peft_logits(lr_base, tmp_path / "full"), _logits(load_delta_model(lr_base, dq)), atol=1e-4, rtol=1e-4
    )
    low = export_peft(dq, tmp_path / "low", fold_rank=1)
    assert max(low.folded.values()) > 1e-3 and set(low.lora_modules.values()) == {1}


def _peft_adapter(base: Path, out: Path, arch: str) -> torch.nn.Module:
    """A saved PEFT LoRA adapter with non-zero B (r=4, alpha=8, one module at r=2 / alpha=6)."""
    model = load_delta_model(base, None)
    targets = list(LINEARS[arch])
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=arch == "gpt2",
        rank_pattern={targets[0]: 2}, alpha_pattern={targets[0]: 6},
    )  # fmt: skip
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    wrapped.save_pretrained(str(out))
    return wrapped.merge_and_unload()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_import_applies_as_the_merged_peft_model(tmp_path, arch):
    base, _ = _lowrank_pair(tmp_path, arch)
    merged = _logits(_peft_adapter(base, tmp_path / "adapter", arch))
    delta = import_peft(tmp_path / "adapter", base, tmp_path / "delta")
    assert delta.manifest.codec.name == "svd"
    torch.testing.assert_close(
        _logits(load_delta_model(base, tmp_path / "delta")), merged, atol=1e-4, rtol=1e-4
    )
    recompressed = import_peft(tmp_path / "adapter", base, tmp_path / "dq", method="dqrelo", ratio=0.25)
    assert recompressed.manifest.codec.name == "dqrelo"


def _write_adapter(path: Path, config: dict, tensors: dict) -> Path:
    from safetensors.torch import save_file

    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


@pytest.mark.parametrize(
    ("config", "key", "shape_a", "error", "match"),
    [
        ({"r": "4"}, "model.layers.0.self_attn.q_proj", (4, 64), FormatError, "r must be a positive integer"),
        ({"lora_alpha": True}, "model.layers.0.self_attn.q_proj", (4, 64), FormatError, "lora_alpha"),
        ({"peft_type": "IA3"}, "model.layers.0.self_attn.q_proj", (4, 64), FormatError, "peft_type"),
        ({"use_dora": True}, "model.layers.0.self_attn.q_proj", (4, 64), FormatError, "DoRA"),
        ({}, "model.layers.0.self_attn.nope", (4, 64), TensorMismatchError, "without a 2-D base weight"),
        ({}, "model.layers.0.self_attn.q_proj", (4, 32), TensorMismatchError, "LoRA update"),
        ({"fan_in_fan_out": True}, "model.layers.0.self_attn.q_proj", (4, 64), FormatError, "fan_in_fan_out"),
    ],
)
def test_import_refuses_hostile_adapters(tmp_path, config, key, shape_a, error, match):
    base, _ = _lowrank_pair(tmp_path, "llama")
    tensors = {
        f"base_model.model.{key}.lora_A.weight": torch.zeros(shape_a),
        f"base_model.model.{key}.lora_B.weight": torch.zeros(64, 4),
    }
    adapter = _write_adapter(
        tmp_path / "bad", {"peft_type": "LORA", "r": 4, "lora_alpha": 4, **config}, tensors
    )
    with pytest.raises(error, match=match):
        import_peft(adapter, base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_import_refuses_unknown_keys(tmp_path):
    base, _ = _lowrank_pair(tmp_path, "llama")
    tensors = {"base_model.model.model.norm.weight": torch.zeros(64)}
    adapter = _write_adapter(tmp_path / "bad", {"peft_type": "LORA", "r": 4, "lora_alpha": 4}, tensors)
    with pytest.raises(FormatError, match="cannot import: base_model.model.model.norm.weight"):
        import_peft(adapter, base, tmp_path / "out")


def test_untied_embeddings_export_and_tied_ones_refuse(tmp_path):
    base, target = _lowrank_pair(tmp_path, "llama", ("embed_tokens", "lm_head"))
    deltakit.compress(base, target, tmp_path / "delta", method="svd", rank=3)
    report = export_peft(tmp_path / "delta", tmp_path / "adapter")
    assert {"model.embed_tokens", "lm_head"} <= set(report.lora_modules)
    reference = _logits(load_delta_model(base, tmp_path / "delta"))
    torch.testing.assert_close(_peft_logits(base, tmp_path / "adapter"), reference, atol=1e-4, rtol=1e-4)
    gbase, gtarget = _lowrank_pair(tmp_path / "g", "gpt2", ("wte",))
    deltakit.compress(gbase, gtarget, tmp_path / "gdelta", method="svd", rank=3)
    with pytest.raises(UsageError, match=r"transformer.wte.weight \(embedding, tied to the output head\)"):
        export_peft(tmp_path / "gdelta", tmp_path / "gadapter")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_modules_to_save_carries_changed_norms(tmp_path, arch):
    base, target = _lowrank_pair(tmp_path, arch)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    norm = "model.norm" if arch == "llama" else "transformer.ln_f"
    with torch.no_grad():
        for param in model.get_submodule(norm).parameters():
            param.add_(0.1)
    save_model(model, tmp_path / "ft2", torch.float32)
    deltakit.compress(base, tmp_path / "ft2", tmp_path / "delta", method="svd", rank=3)
    with pytest.raises(UsageError, match="modules_to_save=True"):
        export_peft(tmp_path / "delta", tmp_path / "refused")
    report = export_peft(tmp_path / "delta", tmp_path / "adapter", modules_to_save=True)
    assert report.modules_to_save == [norm]
    reference = _logits(load_delta_model(base, tmp_path / "delta"))
    torch.testing.assert_close(_peft_logits(base, tmp_path / "adapter"), reference, atol=1e-4, rtol=1e-4)
