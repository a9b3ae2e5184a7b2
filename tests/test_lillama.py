"""lillama: rank allocation, model mode (compress / load / export), distillation, delta mode, bad inputs.

Tiny random Llama models with a byte-level tokenizer saved beside them (tests/lillama_helpers.py).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from lillama_helpers import make_finetune, make_llama, write_text

import deltakit
from deltakit.errors import BudgetError, UsageError
from deltakit.lillama.blocks import block_outputs, capture_block_inputs, decoder_layers
from deltakit.lillama.distill import DistillSettings, block_loss, train_block
from deltakit.lillama.lowrank import LowRankLinear, break_even_rank, set_submodule
from deltakit.lillama.ranks import LinearSpec, allocate_ranks, candidate_ranks, model_params_after

FAST = {"rank_step": "8", "lr": "3e-3", "batch_size": "4"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lillama")
    base = make_llama(root / "base", layers=2)
    return {"root": root, "base": base, "text": write_text(root / "cal.txt", 40)}


def _specs(layers: int = 6) -> list[LinearSpec]:
    specs = []
    for i in range(layers):
        for name, (out, inp) in {
            "q": (256, 256),
            "k": (64, 256),
            "up": (512, 256),
            "down": (256, 512),
        }.items():
            specs.append(LinearSpec(f"layers.{i}.{name}", i, out, inp))
    return specs


@pytest.mark.parametrize("strategy", ["bottom", "top", "uniform"])
@pytest.mark.parametrize("reduction", [0.1, 0.3])
def test_rank_allocation_meets_target_and_only_reduces(strategy, reduction):
    specs = _specs()
    total = sum(s.dense_params for s in specs) + 100_000
    ranks = allocate_ranks(specs, total, reduction, strategy=strategy, step=16)
    after = model_params_after(total, specs, ranks)
    assert after <= total * (1 - reduction)
    assert after >= total * (1 - reduction) - 2 * 512 * 16 * len(specs)  # overshoot bounded by a step each
    by_name = {s.name: s for s in specs}
    for name, rank in ranks.items():
        s = by_name[name]
        assert rank % 16 == 0 and rank < break_even_rank(s.out_features, s.in_features)
        assert s.params_at(rank) < s.dense_params
    layers = sorted({by_name[n].layer for n in ranks})
    if strategy == "bottom":
        assert layers == list(range(len(layers)))
    elif strategy == "top":
        assert layers == list(range(6 - len(layers), 6))
    else:
        assert len(layers) == 6


def test_candidate_ranks_only_below_break_even():
    spec = LinearSpec("k", 0, 64, 256)  # break-even 51.2
    assert candidate_ranks(spec, 16, 0.0) == [16, 32, 48]
    assert candidate_ranks(spec, 16, 0.5) == [32, 48]
    assert candidate_ranks(LinearSpec("x", 0, 8, 8), 8, 0.0) == []  # break-even 4 < one step


def test_unreachable_reduction_names_the_max():
    specs = _specs(2)
    total = sum(s.dense_params for s in specs)
    with pytest.raises(BudgetError, match=r"largest reachable reduction is \d+\.\d+%"):
        allocate_ranks(specs, total, 0.95, step=16)


def test_model_mode_roundtrip_and_export(tiny, tmp_path):
    out = tmp_path / "small"
    report = deltakit.compress_model(
        tiny["base"],
        out,
        method="lillama",
        data=[tiny["text"]],
        tokens=512,
        seq_len=32,
        reduction=0.2,
        overrides=FAST,
    )
    assert report["params_after"] <= report["params_before"] * 0.8
    assert report["reduction"] == pytest.approx(0.2, abs=0.03)
    model = deltakit.load_model(out)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    assert any(isinstance(m, LowRankLinear) for m in model.modules())

    exported = deltakit.export_model(out, tmp_path / "plain")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert not any(isinstance(m, LowRankLinear) for m in plain.modules())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_distillation_lowers_block_loss_vs_svd_init(tiny):
    """Train one factorised block on some windows; its loss on held-out windows drops below the SVD init."""
    from deltakit.lillama.model import quiet_load

    model = quiet_load(tiny["base"])
    _, layers = decoder_layers(model)
    windows = torch.randint(0, 256, (24, 32), generator=torch.Generator().manual_seed(1))
    hidden, kwargs = capture_block_inputs(model, windows, 8)
    teacher_out = block_outputs(layers[0], hidden, kwargs, torch.device("cpu"))
    student = copy.deepcopy(layers[0])
    for p in student.parameters():
        p.requires_grad_(False)
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        set_submodule(student, name, LowRankLinear.from_linear(student.get_submodule(name), 8))
    train, held = slice(0, 16), slice(16, 24)
    init = block_loss(student, hidden[held], teacher_out[held], kwargs, torch.device("cpu"), 8)
    settings = DistillSettings(lr=3e-3, batch_size=4, epochs=4, loss="joint")
    report = train_block(
        student, hidden[train], hidden[train], teacher_out[train], kwargs, settings, torch.device("cpu")
    )
    final = block_loss(student, hidden[held], teacher_out[held], kwargs, torch.device("cpu"), 8)
    assert report["after"]["teacher_input"] < report["before"]["teacher_input"]
    floor = math.log1p(math.exp(-1.0))  # −log σ(1): the loss of a perfect match
    assert final - floor < 0.9 * (init - floor)


def test_svd_baseline_equals_init(tiny, tmp_path):
    """distill=false writes the plain truncated-SVD model at the same ranks."""
    report = deltakit.compress_model(
        tiny["base"],
        tmp_path / "svd",
        method="lillama",
        data=[tiny["text"]],
        tokens=512,
        seq_len=32,
        reduction=0.2,
        overrides={**FAST, "distill": "false"},
    )
    assert report["blocks_distilled"] == 0 and report["factorised_modules"] > 0


def test_delta_mode_roundtrip(tiny, tmp_path):
    target = make_finetune(tiny["base"], tmp_path / "ft")
    delta = deltakit.compress(
        tiny["base"],
        target,
        tmp_path / "delta",
        method="lillama",
        ratio=1 / 4,
        data=[tiny["text"]],
        tokens=512,
        seq_len=32,
        overrides={"batch_size": "4"},
    )
    assert delta.manifest.codec.name == "lillama"
    svd = deltakit.compress(
        tiny["base"], target, tmp_path / "svd", method="svd", ratio=1 / 4, overrides={"factor_bits": "16"}
    )
    out = tmp_path / "applied"
    deltakit.apply(tiny["base"], tmp_path / "delta", out)
    from deltakit.models.checkpoint import open_checkpoint

    rebuilt, ft = open_checkpoint(out), open_checkpoint(target)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert rebuilt.get(name).shape == ft.get(name).shape
    # same storage as svd at the same ratio, but different (distilled) factors
    assert delta.manifest.tensors[name].params["rank"] == svd.manifest.tensors[name].params["rank"]
    assert abs(delta.manifest.stats["encoded_bytes"] - svd.manifest.stats["encoded_bytes"]) == 0
    err = (rebuilt.get(name).float() - ft.get(name).float()).norm() / ft.get(name).float().norm()
    assert err < 0.5


def test_bad_inputs(tiny, tmp_path):
    with pytest.raises(UsageError, match="needs calibration data"):
        deltakit.compress_model(tiny["base"], tmp_path / "a", method="lillama", reduction=0.2)
    with pytest.raises(UsageError, match="tokens="):  # fewer windows than one batch
        deltakit.compress_model(
            tiny["base"],
            tmp_path / "b",
            method="lillama",
            data=[tiny["text"]],
            tokens=64,
            seq_len=32,
            reduction=0.2,
            overrides=FAST,
        )
    with pytest.raises(UsageError, match="lower tokens="):  # more tokens than the text holds
        deltakit.compress_model(
            tiny["base"],
            tmp_path / "c",
            method="lillama",
            data=[tiny["text"]],
            tokens=10**7,
            seq_len=32,
            reduction=0.2,
            overrides=FAST,
        )
    with pytest.raises(BudgetError, match="largest reachable reduction"):
        deltakit.compress_model(
            tiny["base"],
            tmp_path / "d",
            method="lillama",
            data=[tiny["text"]],
            tokens=512,
            seq_len=32,
            reduction=0.9,
            overrides=FAST,
        )
    with pytest.raises(UsageError, match="reduction="):
        deltakit.compress_model(
            tiny["base"],
            tmp_path / "e",
            method="lillama",
            data=[tiny["text"]],
            tokens=512,
            seq_len=32,
            overrides=FAST,
        )


def test_compressed_dir_refuses_plain_transformers_load(tiny, tmp_path):
    """The low-rank modules do not fit the source architecture: a load without trust_remote_code refuses."""
    import json

    from transformers import AutoModelForCausalLM

    out = tmp_path / "sealed"
    deltakit.compress_model(
        tiny["base"], out, method="lillama", data=[tiny["text"]], tokens=512, seq_len=32, reduction=0.2,
        overrides={**FAST, "distill": "false"},
    )  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deltakit_lillama" and config["deltakit_model_type"] == "llama"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(str(out))
    model = deltakit.load_model(out)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    exported = deltakit.export_model(out, tmp_path / "plain")
    assert json.loads((exported / "config.json").read_text())["model_type"] == "llama"
