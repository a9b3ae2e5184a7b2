"""Golden deltas of earlier format versions still open, verify and apply to the same bits."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

import deltakit
from deltakit.format.manifest import FORMAT_VERSION

GOLDEN = Path(__file__).parent / "golden"


def test_golden_v1_delta_is_version_1_on_disk():
    data = json.loads((GOLDEN / "v1_dqrelo" / "manifest.json").read_text())
    assert data["format_version"] == 1 and "groups" in data  # the fixture really is the old layout


def test_golden_v1_delta_verifies_and_applies_to_what_v1_rebuilt():
    delta = deltakit.load_delta(GOLDEN / "v1_dqrelo")
    assert delta.manifest.format_version == FORMAT_VERSION
    kinds = {name: entry.kind for name, entry in delta.manifest.tensors.items()}
    assert kinds == {
        "model.embed_tokens.weight": "encoded",
        "model.layers.0.mlp.up_proj.weight": "encoded",
        "model.layers.0.self_attn.q_proj.weight": "unchanged",
        "model.layers.0.input_layernorm.weight": "passthrough",
        "model.layers.0.new.weight": "passthrough",
    }
    assert delta.manifest.tensors["model.embed_tokens.weight"].extra_rows is not None
    assert deltakit.verify(GOLDEN / "v1_dqrelo")["files_checked"] == 1
    base = load_file(GOLDEN / "v1_base.safetensors")
    report = deltakit.apply(base, GOLDEN / "v1_dqrelo")
    expected = load_file(GOLDEN / "v1_dqrelo_applied.safetensors")
    assert report.state_dict.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(report.state_dict[name], tensor), name
    assert report.base_fingerprint == delta.manifest.base.fingerprint
