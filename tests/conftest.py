"""Shared fixtures: tiny checkpoints built once per session (no hub), and helpers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings as hypothesis_settings

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import fixtures_models as fm  # noqa: E402

# CI replays the same property-test examples on every run (a failure there is reproducible, never luck);
# a developer's run explores new random examples each time.
hypothesis_settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session", params=fm.ARCHS)
def bf16_pair(request, models_root) -> tuple[Path, Path]:
    """(base_dir, finetune_dir) in bf16 for each architecture."""
    return fm.make_pair(models_root / "bf16", request.param, torch.bfloat16)


@pytest.fixture(scope="session")
def llama_pair(models_root) -> tuple[Path, Path]:
    return fm.make_pair(models_root / "llama", "llama", torch.bfloat16)


@pytest.fixture(scope="session")
def qwen_pair(models_root) -> tuple[Path, Path]:
    return fm.make_pair(models_root / "qwen", "qwen2", torch.bfloat16)


@pytest.fixture(scope="session")
def gpt2_pair(models_root) -> tuple[Path, Path]:
    return fm.make_pair(models_root / "gpt2", "gpt2", torch.bfloat16)


@pytest.fixture(scope="session")
def fp32_pair(models_root) -> tuple[Path, Path]:
    return fm.make_pair(models_root / "fp32", "qwen2", torch.float32)


@pytest.fixture(scope="session")
def frozen_embeddings_pair(models_root) -> tuple[Path, Path]:
    """A Llama fine-tune whose embedding table is bit-identical to the base's."""
    return fm.make_pair(models_root / "frozen", "llama", torch.bfloat16, keep_embeddings=True)


@pytest.fixture(scope="session")
def resized_pair(models_root) -> tuple[Path, Path]:
    """A Llama fine-tune with 16 more vocabulary rows in embed_tokens and lm_head."""
    return fm.make_resized_twin("llama", models_root / "resized", extra_rows=16)


@pytest.fixture(scope="session")
def sharded_pair(models_root) -> tuple[Path, Path]:
    """Base and fine-tune saved as several safetensors shards with model.safetensors.index.json."""
    return fm.make_pair(models_root / "sharded", "llama", torch.bfloat16, max_shard_size="40KB")


@pytest.fixture(scope="session")
def bin_pair(models_root, llama_pair) -> tuple[Path, Path]:
    """The Llama pair re-saved as pytorch_model.bin checkpoints."""
    base, target = llama_pair
    root = models_root / "bin"
    return fm.save_bin_checkpoint(base, root / "base"), fm.save_bin_checkpoint(target, root / "ft")


@pytest.fixture(scope="session")
def state_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A small in-memory (base, target) state dict pair: two matrices, a vector and an unchanged matrix."""
    g = torch.Generator().manual_seed(7)
    base = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(96, 64, generator=g) * 0.02,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(64, 64, generator=g) * 0.02,
        "model.layers.0.input_layernorm.weight": torch.ones(64),
        "model.embed_tokens.weight": torch.randn(128, 64, generator=g) * 0.02,
    }
    target = {}
    for name, w in base.items():
        if "embed" in name:
            target[name] = w.clone()
        elif w.ndim == 2:
            target[name] = w + 2e-3 * fm.structured_delta(*w.shape, g)
        else:
            target[name] = w + 1e-3 * torch.randn(w.shape, generator=g)
    return base, target


@pytest.fixture
def fresh_registry(monkeypatch):
    """A codec registry that loads its plug-ins again, with the built-in codecs kept."""
    from deltakit.codecs import registry

    registry.list_codecs()  # built-ins register once, at first import: load them before copying
    monkeypatch.setattr(registry.CODECS, "_loaded", False)
    monkeypatch.setattr(registry.CODECS, "_table", dict(registry.CODECS._table))
