"""Evaluation maths on tiny, locally built Llama models (random init, no hub)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltakit.eval.lm import compare_models, iter_windows, perplexity, tokenize
from deltakit.eval.metrics import gain_kept, kl_closed
from deltakit.eval.weights import delta_relative_error, relative_frobenius

WORDS = [f"w{i}" for i in range(40)]


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(WORDS) + 1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    """A word-level tokenizer over WORDS (id 0 = [UNK]), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def shifted(base, delta: dict[str, torch.Tensor], scale: float = 1.0):
    """A copy of ``base`` with ``scale · delta`` added to the named parameters."""
    import copy

    m = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in delta:
                p.add_(scale * delta[name])
    return m.eval()


@pytest.fixture(scope="module")
def models():
    base = tiny_llama(0)
    g = torch.Generator().manual_seed(1)
    delta = {
        n: 0.05 * torch.randn(p.shape, generator=g)
        for n, p in base.named_parameters()
        if n.endswith(("q_proj.weight", "down_proj.weight"))
    }
    return base, shifted(base, delta), delta


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(2)
    return torch.randint(1, len(WORDS) + 1, (150,), generator=g)


def direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of tokens 1..n-1 from one full-context forward: ``(n-1,)``."""
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[1:], reduction="none")


# ---------------------------------------------------------------- windows and perplexity


@pytest.mark.parametrize(
    ("n", "window", "stride"), [(10, 4, None), (10, 4, 4), (10, 4, 2), (3, 8, None), (97, 16, 5)]
)
def test_windows_score_each_token_at_most_once_with_context(n, window, stride):
    wins = list(iter_windows(n, window, stride))
    scored = [t for w in wins for t in range(w.end - w.n_scored, w.end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    assert all(w.end - w.begin <= window and w.end - w.n_scored >= w.begin + 1 for w in wins)
    if stride is None or stride < window:
        assert sorted(scored) == list(range(1, n))  # every token but the first


def test_windows_reject_bad_settings():
    with pytest.raises(ValueError):
        list(iter_windows(10, 4, 5))
    with pytest.raises(ValueError):
        list(iter_windows(10, 1))


def test_perplexity_full_window_matches_direct(models, ids):
    base, _, _ = models
    expected = math.exp(direct_nll(base, ids).mean().item())
    assert perplexity(base, ids, window=len(ids)) == pytest.approx(expected, rel=1e-5)


def test_perplexity_strided_matches_manual(models, ids):
    base, _, _ = models
    window, stride = 32, 20
    nll, count = 0.0, 0
    for w in iter_windows(len(ids), window, stride):
        seg = ids[w.begin : w.end]
        per_tok = direct_nll(base, seg)  # predicts seg[1:]
        nll += per_tok[-w.n_scored :].sum().item()
        count += w.n_scored
    assert count == len(ids) - 1
    assert perplexity(base, ids, window, stride) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_perplexity_progress_and_bf16_model(models, ids):
    base, _, _ = models
    calls = []
    p32 = perplexity(base, ids, 64, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1][0] == calls[-1][1] == len(calls)
    import copy

    p16 = perplexity(copy.deepcopy(base).to(torch.bfloat16), ids, 64)
    assert p16 == pytest.approx(p32, rel=0.05)


# ---------------------------------------------------------------- KL and top-1


def test_compare_identical_model_is_zero(models, ids):
    base, ft, _ = models
    res = compare_models(ft, {"same": ft, "base": base}, ids, window=48)
    same = res.candidates["same"]
    assert same.kl == pytest.approx(0.0, abs=1e-7)
    assert same.top1 == 1.0
    assert same.ppl == pytest.approx(res.reference_ppl, rel=1e-6)
    assert res.candidates["base"].kl > 1e-4
    assert res.tokens == len(ids) - 1


def test_kl_matches_direct_computation(models, ids):
    base, ft, _ = models
    with torch.no_grad():
        lp_ft = F.log_softmax(ft(input_ids=ids.unsqueeze(0)).logits[0, :-1].float(), -1)
        lp_b = F.log_softmax(base(input_ids=ids.unsqueeze(0)).logits[0, :-1].float(), -1)
    kl = F.kl_div(lp_b, lp_ft, log_target=True, reduction="batchmean").item()  # KL(ft ‖ base) per token
    top1 = (lp_ft.argmax(-1) == lp_b.argmax(-1)).float().mean().item()
    res = compare_models(ft, {"base": base}, ids, window=len(ids))
    assert res.candidates["base"].kl == pytest.approx(kl, rel=1e-4)
    assert res.candidates["base"].top1 == pytest.approx(top1)
    assert res.reference_ppl == pytest.approx(math.exp(direct_nll(ft, ids).mean().item()), rel=1e-5)


def test_partial_reconstruction_sits_between(models, ids):
    base, ft, delta = models
    half = shifted(base, delta, 0.5)
    res = compare_models(ft, {"base": base, "half": half, "exact": shifted(base, delta)}, ids, window=64)
    kb, kh, ke = (res.candidates[k].kl for k in ("base", "half", "exact"))
    assert ke < 1e-6 < kh < kb
    assert 0 < kl_closed(kh, kb) < 1 and kl_closed(ke, kb) == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- scalar metrics


def test_gain_kept_and_kl_closed_values():
    assert gain_kept(ppl_base=20.0, ppl_recon=10.0, ppl_ft=10.0) == 1.0
    assert gain_kept(20.0, 20.0, 10.0) == 0.0
    assert gain_kept(20.0, 15.0, 10.0) == pytest.approx(0.5)
    assert gain_kept(20.0, 8.0, 10.0) > 1.0  # overshoot: why gain kept never ranks alone
    assert math.isnan(gain_kept(10.0, 9.0, 10.0))
    assert kl_closed(0.0, 0.3) == 1.0 and kl_closed(0.3, 0.3) == 0.0 and kl_closed(0.6, 0.3) == -1.0
    assert math.isnan(kl_closed(0.1, 0.0))


# ---------------------------------------------------------------- weights


def test_relative_frobenius(models):
    base, ft, delta = models
    rel = relative_frobenius(ft, ft)
    assert set(rel) == set(ft.state_dict()) and all(v == 0.0 for v in rel.values())
    rel = relative_frobenius(ft, base)
    name = next(iter(delta))
    expected = (delta[name].double().norm() / base.state_dict()[name].double().norm()).item()
    assert rel[name] == pytest.approx(expected, rel=1e-5)
    assert rel["model.norm.weight"] == 0.0


def test_delta_relative_error(models, tmp_path):
    base, ft, delta = models
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    half = shifted(base, delta, 0.5)
    assert delta_relative_error(tmp_path / "ft", tmp_path / "ft", tmp_path / "base")["overall"] == 0.0
    res = delta_relative_error(half, tmp_path / "ft", tmp_path / "base")  # module vs dirs, streamed
    assert res["overall"] == pytest.approx(0.5, rel=1e-5)
    assert all(res["per_tensor"][n] == pytest.approx(0.5, rel=1e-5) for n in delta)
    assert res["unchanged_tensors"] == len(res["per_tensor"]) - len(delta)
    from deltakit.errors import TensorMismatchError

    with pytest.raises(TensorMismatchError):
        relative_frobenius({"a": torch.zeros(2)}, {"b": torch.zeros(2)})


# ---------------------------------------------------------------- evaluate_delta and the CLI


@pytest.fixture(scope="module")
def ckpts(models, tmp_path_factory):
    base, ft, delta = models
    root = tmp_path_factory.mktemp("ckpts")
    tok = tiny_tokenizer()
    for name, m in {
        "base": base,
        "ft": ft,
        "exact": shifted(base, delta),
        "half": shifted(base, delta, 0.5),
    }.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    g = torch.Generator().manual_seed(5)
    text = " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (300,), generator=g).tolist())
    (root / "text.txt").write_text(text)
    return root


def test_evaluate_delta_exact_and_half(ckpts):
    from deltakit.eval.report import evaluate_delta

    text = (ckpts / "text.txt").read_text()
    res = evaluate_delta(
        ckpts / "base",
        ckpts / "ft",
        [ckpts / "exact", ckpts / "half"],
        {"domain": text},
        general=" ".join(WORDS),
        window=64,
    )
    json.dumps(res, allow_nan=False)  # JSON-ready: no NaN/inf
    d = res["texts"]["domain"]
    assert d["tokens"] == 299 and d["kl_ft_base"] > 0
    ex, half = d["candidates"]["exact"], d["candidates"]["half"]
    assert ex["kl"] < 1e-6 and ex["top1"] == 1.0
    assert ex["kl_closed"] == pytest.approx(1.0, abs=1e-4) and ex["gain_kept"] == pytest.approx(1.0, abs=1e-3)
    assert 0 < half["kl_closed"] < 1
    assert res["texts"]["general"]["kind"] == "general"
    assert res["weights"]["exact"]["overall"] == 0.0
    assert res["weights"]["half"]["overall"] == pytest.approx(0.5, rel=1e-5)


def test_evaluate_delta_routes_delta_dirs_through_apply(ckpts, models, monkeypatch, tmp_path):
    """A dir with manifest.json is rebuilt with deltakit.apply (stubbed here) on the base."""
    from types import SimpleNamespace

    from deltakit.core import apply as apply_module
    from deltakit.eval.report import evaluate_delta
    from deltakit.models.checkpoint import open_checkpoint

    _, _, delta = models
    ddir = tmp_path / "delta"
    ddir.mkdir()
    (ddir / "manifest.json").write_text("{}")
    seen = []

    def fake_apply(base_dir, delta_dir):
        seen.append(Path(delta_dir))
        source = open_checkpoint(base_dir)
        base_state = {name: source.get(name) for name in source.names()}
        return SimpleNamespace(
            state_dict={k: v + delta[k] if k in delta else v for k, v in base_state.items()}
        )

    monkeypatch.setattr(apply_module, "apply", fake_apply)
    text = (ckpts / "text.txt").read_text()
    res = evaluate_delta(ckpts / "base", ckpts / "ft", {"d": ddir}, {"t": text}, general=False, weights=False)
    assert seen == [ddir]
    assert res["texts"]["t"]["candidates"]["d"]["kl"] < 1e-6


def test_evaluate_delta_with_real_codec(ckpts):
    """End to end with the library's own compress/apply: a lossless delta reconstructs exactly."""
    import deltakit
    from deltakit.eval.report import evaluate_delta

    if "lossless" not in deltakit.list_codecs():
        pytest.skip("no lossless codec registered")
    out = ckpts / "delta-lossless"
    if not out.exists():
        deltakit.compress(ckpts / "base", ckpts / "ft", out, method="lossless")
    text = (ckpts / "text.txt").read_text()
    res = evaluate_delta(ckpts / "base", ckpts / "ft", [out], {"t": text}, general=False, window=64)
    c = res["texts"]["t"]["candidates"]["delta-lossless"]
    assert c["kl"] < 1e-6 and c["top1"] == 1.0
    assert res["weights"]["delta-lossless"]["overall"] == 0.0


def test_evaluate_delta_errors(ckpts, tmp_path):
    from deltakit.errors import FormatError, UsageError
    from deltakit.eval.report import evaluate_delta

    with pytest.raises(FormatError):
        evaluate_delta(ckpts / "base", ckpts / "ft", [tmp_path], {"t": "w1 w2 w3"}, general=False)
    with pytest.raises(UsageError):  # no text given and no zoo.json to find one
        evaluate_delta(ckpts / "base", ckpts / "ft", [ckpts / "exact"], general=False)
    with pytest.raises(UsageError):
        evaluate_delta(ckpts / "base", ckpts / "ft", {"base": ckpts / "exact"}, {"t": "w1 w2"}, general=False)


def test_tokenize_truncates():
    ids = tokenize(tiny_tokenizer(), "w1 w2 w3 w4", max_tokens=3)
    assert ids.tolist() == [2, 3, 4] and ids.dtype == torch.long


def test_eval_cli_json_and_table(ckpts):
    from click.testing import CliRunner

    from deltakit_cli.eval_cmds import eval_command

    args = ["--base", str(ckpts / "base"), "--finetune", str(ckpts / "ft"), str(ckpts / "exact")]
    args += ["--text", str(ckpts / "text.txt"), "--no-general", "--window", "64"]
    res = CliRunner().invoke(eval_command, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["texts"]["text.txt"]["candidates"]["exact"]["top1"] == 1.0
    from rich.console import Console

    from deltakit_cli.eval_cmds import print_result

    console = Console(record=True, width=160)
    print_result(out, console)
    table = console.export_text()
    assert "KL closed" in table and "exact" in table and "finetune" in table


def test_eval_cli_takes_registry_refs(ckpts, tmp_path):
    """``deltakit eval`` resolves a registry base name and a NAME:TAG delta through the registry."""
    from click.testing import CliRunner

    import deltakit
    from deltakit.registry import Registry
    from deltakit_cli.eval_cmds import eval_command

    reg = Registry.open(tmp_path / "reg")
    reg.add_base("evalbase", ckpts / "base")
    deltakit.compress(ckpts / "base", ckpts / "ft", tmp_path / "d", method="lossless")
    reg.push(tmp_path / "d", "exactft:v1")
    args = [
        "--base",
        "evalbase",
        "--finetune",
        str(ckpts / "ft"),
        "exactft:v1",
        "--registry",
        str(tmp_path / "reg"),
    ]
    args += ["--text", str(ckpts / "text.txt"), "--no-general", "--window", "64", "--json"]
    res = CliRunner().invoke(eval_command, args)
    assert res.exit_code == 0, res.output
    (candidate,) = json.loads(res.stdout)["texts"]["text.txt"]["candidates"].values()
    assert candidate["kl"] < 1e-6 and candidate["top1"] == 1.0
    missing = CliRunner().invoke(eval_command, [*args[:4], "nosuch:v9", *args[5:]])
    assert missing.exit_code != 0 and "neither a delta directory nor a registry ref" in str(
        missing.exception or missing.output
    )
