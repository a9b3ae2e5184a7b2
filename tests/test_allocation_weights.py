"""Calibration-weighted rate–distortion allocation: input-energy weights from the base model's activations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fixtures_models as fm
import torch

import deltakit

GOLDEN = Path(__file__).parent / "golden" / "rd_data_free.json"


def golden_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A small in-memory (base, fine-tune) pair of Llama-named matrices with unequal deltas."""
    g = torch.Generator().manual_seed(12)
    shapes = {
        "model.embed_tokens.weight": (128, 64),
        "model.layers.0.self_attn.q_proj.weight": (64, 64),
        "model.layers.0.self_attn.k_proj.weight": (32, 64),
        "model.layers.0.mlp.up_proj.weight": (96, 64),
        "model.layers.0.mlp.down_proj.weight": (64, 96),
    }
    base, target = {}, {}
    for k, (name, shape) in enumerate(shapes.items()):
        base[name] = torch.randn(*shape, generator=g) * 0.02
        target[name] = base[name] + 1e-3 * (k + 1) * fm.structured_delta(*shape, g, rank=4 + 2 * k)
    base["model.layers.0.input_layernorm.weight"] = torch.ones(64)
    target["model.layers.0.input_layernorm.weight"] = torch.ones(64) + 1e-3 * torch.randn(64, generator=g)
    return base, target


def _sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().flatten().view(torch.uint8).numpy().tobytes()).hexdigest()


def golden_record(delta) -> dict:
    """What must not change: stats, every entry's params and a digest of every stored tensor."""
    tensors = {}
    for name, entry in delta.manifest.tensors.items():
        stored = delta.codec_tensors(name) if entry.kind == "encoded" else {}
        tensors[name] = {
            "kind": entry.kind,
            "params": entry.params,
            "stored": {k: _sha(v) for k, v in sorted(stored.items())},
        }
    return json.loads(json.dumps({"stats": delta.manifest.stats, "tensors": tensors}))
