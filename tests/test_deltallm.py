"""deltallm: plan construction, real sharing, SVD init, export == load, PMR, training, checkpoint/resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import deltakit
from deltakit.deltallm import DeltaLinear, DeltaLLMConfig, build_plan, count_parameters, describe_model
from deltakit.deltallm.baselines import (
    block_influence,
    blocks_to_drop,
    drop_blocks_,
    svd_baseline_,
    svd_modules,
)
from deltakit.deltallm.compress import model_layout
from deltakit.deltallm.io import format_description
from deltakit.deltallm.modules import install_deltas_
from deltakit.distill.pmr import PMRSchedule, logit_kl
from deltakit.errors import BudgetError, ConfigError, UsageError
from deltakit.models.checkpoint import CheckpointReader

LAYERS, HIDDEN, INTER = 8, 32, 64
WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "a",
    "mat",
    "log",
    "big",
    "small",
    "red",
    "blue",
    "quick",
    "slow",
    "and",
    "then",
    "it",
    "was",
    "happy",
    "sad",
    "home",
    "tree",
    "bird",
    "sang",
    "loud",
    "soft",
    "over",
    "near",
    "far",
]


def _corpus(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    words, prev = [], "the"
    for _ in range(n_words):  # a Markov chain so the text has structure
        prev = WORDS[(WORDS.index(prev) * 7 + rng.choice((1, 2, 3, 5))) % len(WORDS)]
        words.append(prev)
    return " ".join(words) + "\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster than two, and far faster on a CPU shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A random-init 8-block Llama (fp32) with a local word-level tokenizer, and calibration text."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("deltallm")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    model = tf.LlamaForCausalLM(config)
    model_dir = root / "model"
    model.save_pretrained(str(model_dir))
    fast.save_pretrained(str(model_dir))
    data = root / "calib.txt"
    data.write_text(_corpus(1, 3000))
    return {"model": model_dir, "data": data, "root": root}


def _compress(tiny, name: str, **sets) -> tuple[Path, dict]:
    out = tiny["root"] / name
    overrides = {"batch_size": "4", "lr": "0.02", **{k: str(v) for k, v in sets.items()}}
    report = deltakit.compress_model(
        tiny["model"],
        out,
        method="deltallm",
        data=[tiny["data"]],
        tokens=1024,
        seq_len=32,
        reduction=None if "rank" in sets else 0.08,
        overrides=overrides,
    )
    return out, report


def _layout(tiny):
    return model_layout(CheckpointReader(tiny["model"]))


# ---------------------------------------------------------------- plan


def test_plan_layouts_keep_first_last(tiny):
    layout = _layout(tiny)
    alt = build_plan(layout, layout="alternating", share="mlp", rank=4)
    assert alt.groups == [[2, 3], [4, 5]] and alt.anchor_of == {3: 2, 5: 4}
    seq = build_plan(layout, layout="sequential", share="both", followers_per_anchor=2, rank=4)
    assert seq.groups == [[2, 3, 4], [5]] and seq.anchor_of == {3: 2, 4: 2}
    assert [alt.role(i) for i in range(LAYERS)] == [
        "kept",
        "kept",
        "anchor",
        "follower",
        "anchor",
        "follower",
        "kept",
        "kept",
    ]
    assert len(seq.kinds) == 7 and len(alt.kinds) == 3


def test_reduction_met_with_largest_rank(tiny):
    layout = _layout(tiny)
    plan = build_plan(layout, layout="sequential", share="both", followers_per_anchor=3, reduction=0.15)
    assert plan.reduction >= 0.15
    assert plan.removed_params(plan.rank + 1) < 0.15 * layout.total_params  # the largest rank that meets it
    assert plan.compressed_params == layout.total_params - plan.removed_params()


def test_unreachable_reduction_names_max(tiny):
    with pytest.raises(BudgetError, match=r"at most 0\.\d+"):
        build_plan(_layout(tiny), layout="alternating", share="mlp", reduction=0.9)


def test_bad_config_names_choices(tiny):
    with pytest.raises(ConfigError, match="sequential, alternating"):
        DeltaLLMConfig().with_overrides({"layout": "zigzag"})
    with pytest.raises(ConfigError, match="mlp, attention, both"):
        DeltaLLMConfig().with_overrides({"share": "embeddings"})


def test_no_data_and_conflicting_targets(tiny):
    with pytest.raises(UsageError, match="data="):
        deltakit.compress_model(tiny["model"], tiny["root"] / "x", method="deltallm", reduction=0.2)
    with pytest.raises(UsageError, match="not both"):
        deltakit.compress_model(
            tiny["model"],
            tiny["root"] / "y",
            method="deltallm",
            data=[tiny["data"]],
            tokens=256,
            seq_len=32,
            reduction=0.2,
            overrides={"rank": "2"},
        )
    assert not (tiny["root"] / "y").exists()


# ---------------------------------------------------------------- modules


def test_svd_init_exact_at_full_rank(tiny):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny["model"])
    plan = build_plan(
        _layout(tiny), layout="alternating", share="mlp", rank=HIDDEN
    )  # full rank: min(out, in)
    originals = {f: model.get_submodule(f).weight.detach().clone() for f, _ in plan.shared_modules()}
    deltas = install_deltas_(model, plan, init="svd")
    for name, module in deltas.items():
        torch.testing.assert_close(module.merged_weight(), originals[name], atol=1e-5, rtol=1e-5)
    assert isinstance(model.get_submodule("model.layers.3.mlp.up_proj"), DeltaLinear)
    assert (
        model.get_submodule("model.layers.3.mlp.up_proj").weight
        is model.get_submodule("model.layers.2.mlp.up_proj").weight
    )


def test_pmr_schedule_values():
    s = PMRSchedule(start=0.5, ramp=0.5, total=100)
    assert s.p(0) == 0.5 and s.p(25) == pytest.approx(0.75) and s.p(50) == 1.0 and s.p(99) == 1.0
    plain = PMRSchedule(start=1.0, ramp=0.7, total=10)
    assert all(plain.p(t) == 1.0 for t in range(10))
    assert bool(plain.sample(3, 5, seed=0).all())
    low = PMRSchedule(start=0.0, ramp=1.0, total=1000)
    assert int(low.sample(0, 4, seed=1).sum()) == 1  # p=0 still replaces one module so the step trains
    assert torch.equal(s.sample(7, 6, seed=3), s.sample(7, 6, seed=3))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def untrained(tiny):
    return _compress(tiny, "untrained", train="false")


@pytest.fixture(scope="module")
def trained(tiny):
    return _compress(tiny, "trained", steps=30, eval_every=10, pmr_start=0.5, pmr_ramp=0.5)


def test_loaded_model_really_shares(tiny, untrained):
    out, report = untrained
    model = deltakit.load_model(out)
    plan_params = report["params"]
    assert count_parameters(model) == plan_params["compressed"] < plan_params["original"]
    assert plan_params["reduction"] >= 0.08
    for layer, anchor in ((3, 2), (5, 4)):
        for kind in ("gate_proj", "up_proj", "down_proj"):
            f = model.get_submodule(f"model.layers.{layer}.mlp.{kind}")
            assert isinstance(f, DeltaLinear)
            assert f.weight is model.get_submodule(f"model.layers.{anchor}.mlp.{kind}").weight
    assert not (out / "model.safetensors").exists()


def test_export_logits_match_loaded(tiny, trained):
    import transformers as tf

    out, _ = trained
    plain = tiny["root"] / "plain"
    deltakit.export_model(out, plain)
    ids = torch.randint(0, 30, (2, 16))
    with torch.no_grad():
        a = deltakit.load_model(out)(ids).logits
        b = tf.AutoModelForCausalLM.from_pretrained(plain).eval()(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    desc = describe_model(out)
    assert desc["groups"] == [[2, 3], [4, 5]] and desc["params"]["compressed"] < desc["params"]["original"]
    assert any("rank" in line for line in format_description(desc))
    assert desc["training"]["steps"] == 30 and [b["role"] for b in desc["blocks"]][:3] == [
        "kept",
        "kept",
        "anchor",
    ]


def test_training_lowers_kl(tiny, untrained, trained):
    import transformers as tf

    teacher = tf.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny["model"])
    ids = torch.tensor(tokenizer(_corpus(2, 400))["input_ids"][:256]).view(8, 32)  # text unseen in training
    with torch.no_grad():
        t = teacher(ids).logits
        kl_untrained = float(logit_kl(deltakit.load_model(untrained[0])(ids).logits, t))
        kl_trained = float(logit_kl(deltakit.load_model(trained[0])(ids).logits, t))
    assert kl_untrained > 0.01
    assert kl_trained < 0.75 * kl_untrained, (kl_untrained, kl_trained)
    history = json.loads((trained[0] / "training.json").read_text())
    assert len(history["steps"]) == 30 and history["probe"][-1]["kl"] < history["probe"][0]["kl"]


def test_checkpoint_resume_matches_uninterrupted(tiny, trained):
    ckpt = tiny["root"] / "ckpt"
    sets = {
        "steps": "30",
        "eval_every": "10",
        "pmr_start": "0.5",
        "pmr_ramp": "0.5",
        "batch_size": "4",
        "lr": "0.02",
        "checkpoint_dir": str(ckpt),
        "checkpoint_every": "5",
    }

    def crash(done, total, name):
        if done == 12:
            raise KeyboardInterrupt

    out = tiny["root"] / "resumed"
    kwargs = dict(
        method="deltallm", data=[tiny["data"]], tokens=1024, seq_len=32, reduction=0.08, overrides=sets
    )
    with pytest.raises(KeyboardInterrupt):
        deltakit.compress_model(tiny["model"], out, progress=crash, **kwargs)
    assert not out.exists() and json.loads((ckpt / "state.json").read_text())["step"] == 10
    report = deltakit.compress_model(tiny["model"], out, **kwargs)
    assert report["training"]["resumed_from"] == 10
    from safetensors.torch import load_file

    a = load_file(str(out / "deltallm.safetensors"))
    b = load_file(str(trained[0] / "deltallm.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_baselines(tiny, untrained):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    windows = torch.randint(0, 30, (4, 16))
    bi = block_influence(model, windows)
    assert len(bi) == LAYERS and all(0.0 <= x <= 2.0 for x in bi)
    drop = blocks_to_drop(bi, 2, keep_first=2, keep_last=2)
    assert len(drop) == 2 and all(2 <= i < LAYERS - 2 for i in drop)
    before = count_parameters(model)
    drop_blocks_(model, drop)
    assert len(model.model.layers) == LAYERS - 2 and count_parameters(model) < before
    assert model(windows).logits.shape == (4, 16, len(WORDS) + 1)

    from deltakit.deltallm.plan import SharingPlan

    plan = SharingPlan.from_dict(json.loads((untrained[0] / "deltallm.json").read_text())["plan"])
    svd = tf.AutoModelForCausalLM.from_pretrained(tiny["model"])
    svd_baseline_(svd, svd_modules(plan), plan.rank)
    assert count_parameters(svd) == plan.compressed_params  # same parameters removed as DeltaLLM


def test_inspect_shows_plan_and_parameter_counts(untrained, capsys):
    from deltakit_cli.main import main

    out_dir, report = untrained
    main(["inspect", str(out_dir), "--json"])
    described = json.loads(capsys.readouterr().out)
    assert described["params"]["compressed"] < described["params"]["original"]
    main(["inspect", str(out_dir)])
    text = capsys.readouterr().out
    assert "deltallm" in text and "params" in text


def test_compressed_dir_refuses_plain_transformers_load(tiny, untrained):
    """A plain from_pretrained would build random follower weights: without trust_remote_code it refuses."""
    import json

    import transformers as tf

    out, _ = untrained
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deltakit_deltallm" and config["deltakit_model_type"] == "llama"
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        tf.AutoModelForCausalLM.from_pretrained(str(out))
    plain = tiny["root"] / "plain-sealed"
    deltakit.export_model(out, plain)
    assert json.loads((plain / "config.json").read_text())["model_type"] == "llama"
    ids = torch.randint(0, 30, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exported = tf.AutoModelForCausalLM.from_pretrained(str(plain)).eval()(ids).logits
        loaded = deltakit.load_model(out)(ids).logits
    torch.testing.assert_close(exported, loaded, atol=1e-4, rtol=1e-4)
