"""Scale refinement (``refine_scales=True``): BitDelta's scale distillation on a tiny Llama pair.

The pair (tests/lillama_helpers.py) is a random 2-layer Llama and a twin whose matrices moved by a large
low-rank plus dense perturbation, so a ±1 sign matrix is a poor fit and the data-free scale mean|Δ| is
not the one the logits want. The KL of the rebuilt models is measured here, independently of the
report the refinement writes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from cli_support import run_cli as _run
from lillama_helpers import make_finetune, make_llama, write_text

import deltakit
from deltakit.codecs.registry import get_codec
from deltakit.core.decode import load_delta
from deltakit.core.refine import (
    EVAL_WINDOWS,
    LR_FEW,
    LR_MANY,
    STATS_KEY,
    RefineSettings,
    default_lr,
    refinable_codecs,
    refine_scales,
    supports_refinement,
)
from deltakit.distill.data import calibration_batches
from deltakit.errors import NonFiniteError, UsageError
from deltakit.models.checkpoint import open_checkpoint

CAL = {"tokens": 1024, "seq_len": 64}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine")
    base = make_llama(root / "base", layers=2)
    ft = make_finetune(base, root / "ft", scale=1.0)
    return {"root": root, "base": base, "ft": ft, "text": write_text(root / "cal.txt", 40)}


def _windows(pair) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pair["ft"]))
    return calibration_batches([pair["text"]], tok, seq_len=CAL["seq_len"], tokens=CAL["tokens"], seed=0)


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _kl_to_finetune(pair, model_dir, windows: torch.Tensor) -> float:
    """Mean over positions of KL(fine-tune ‖ model) on ``windows`` (n, seq)."""
    teacher, student = _model(pair["ft"]), _model(model_dir)
    with torch.no_grad():
        t = F.log_softmax(teacher(input_ids=windows).logits.double(), -1)
        s = F.log_softmax(student(input_ids=windows).logits.double(), -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def _compress(pair, out, method: str, refine: bool, **extra):
    options = dict(method=method, data=[pair["text"]], **CAL, **extra)
    if refine:
        options["refine_scales"] = True
    return deltakit.compress(pair["base"], pair["ft"], out, **options)


@pytest.mark.parametrize("method", ["bitdelta", "dqrelo", "svd", "deltacome"])
def test_refinement_lowers_the_rebuilt_models_kl(pair, tmp_path, method):
    plain = _compress(pair, tmp_path / "plain", method, refine=False)
    refined = _compress(pair, tmp_path / "refined", method, refine=True)
    report = refined.manifest.stats[STATS_KEY]
    assert report["applied"] and report["kl_after"] < report["kl_before"]
    assert report["tensors"] == refined.manifest.stats["encoded_tensors"]
    assert report["tokens"] == CAL["tokens"] and report["steps"] == 20
    assert STATS_KEY not in plain.manifest.stats

    windows = _windows(pair)
    held = windows[: max(EVAL_WINDOWS, 4)]  # the windows the report is measured on (refine_batch 4)
    kls, held_kls = {}, {}
    for name in ("plain", "refined"):
        deltakit.apply(pair["base"], tmp_path / name, tmp_path / f"{name}-model")
        kls[name] = _kl_to_finetune(pair, tmp_path / f"{name}-model", windows)
        held_kls[name] = _kl_to_finetune(pair, tmp_path / f"{name}-model", held)
    assert kls["refined"] < 0.95 * kls["plain"], kls
    # the report's before/after are the same quantity on the same windows (fp32, before the dtype cast)
    assert report["kl_before"] == pytest.approx(held_kls["plain"], rel=1e-3)
    assert report["kl_after"] == pytest.approx(held_kls["refined"], rel=1e-3)


def _stored(delta_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(p for p in delta_dir.iterdir() if p.suffix == ".safetensors"):
        out.update(load_file(str(shard)))
    return out


@pytest.mark.parametrize(
    ("method", "overrides"),
    [("dqrelo", {"factor_bits": "16"}), ("dqrelo", {"factor_bits": "4"}), ("deltacome", {})],
    ids=["dqrelo-fp16-factors", "dqrelo-4-bit-factors", "deltacome"],
)
def test_only_scales_change_and_sizes_are_identical(pair, tmp_path, method, overrides):
    """Refinement rewrites the sign scale params and the per-vector factor scales (float ``up`` columns
    or quantized ``up_scales`` rows) and nothing else: codes, signs, keys, dtypes, shapes and every
    size are those of the unrefined delta."""
    extra = {"overrides": overrides, "ratio": 0.25}
    plain = _compress(pair, tmp_path / "plain", method, refine=False, **extra)
    refined = _compress(pair, tmp_path / "refined", method, refine=True, **extra)
    assert refined.manifest.stats[STATS_KEY]["applied"]
    assert all(e.params.get("rank", 0) > 0 for e in plain.manifest.tensors.values() if e.kind == "encoded")
    a, b = plain.manifest, refined.manifest
    assert {k: v.size for k, v in a.files.items()} == {k: v.size for k, v in b.files.items()}
    stored_a, stored_b = _stored(tmp_path / "plain"), _stored(tmp_path / "refined")
    assert {k: (v.dtype, v.shape) for k, v in stored_a.items()} == {
        k: (v.dtype, v.shape) for k, v in stored_b.items()
    }
    scale_keys = ("::up", "::up_scales")
    changed_tensors = {k for k in stored_a if not torch.equal(stored_a[k], stored_b[k])}
    assert changed_tensors and all(k.endswith(scale_keys) for k in changed_tensors), changed_tensors
    changed_scales = 0
    for name, entry in a.tensors.items():
        other = b.tensors[name]
        assert (entry.kind, entry.stored, entry.shard) == (other.kind, other.stored, other.shard)
        rest = {k: v for k, v in entry.params.items() if k != "scale"}
        assert rest == {k: v for k, v in other.params.items() if k != "scale"}
        if "scale" in entry.params:
            assert isinstance(other.params["scale"], float) and math.isfinite(other.params["scale"])
            changed_scales += entry.params["scale"] != other.params["scale"]
    if method == "dqrelo":
        assert changed_scales == a.stats["encoded_tensors"]
    stats_b = {k: v for k, v in b.stats.items() if k != STATS_KEY}
    assert stats_b == a.stats  # stored_bytes, param_bytes, ratio: identical
    deltakit.verify(tmp_path / "refined", pair["base"])  # raises on a bad hash, size or tensor


def test_deterministic_and_thread_independent(pair):
    first = _compress(pair, None, "bitdelta", refine=True)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        second = _compress(pair, None, "bitdelta", refine=True)
    finally:
        torch.set_num_threads(previous)
    scales = [{n: e.params.get("scale") for n, e in d.manifest.tensors.items()} for d in (first, second)]
    assert scales[0] == scales[1]
    assert first.manifest.stats[STATS_KEY] == second.manifest.stats[STATS_KEY]
    other_seed = _compress(pair, None, "bitdelta", refine=True, seed=1)
    assert {n: e.params.get("scale") for n, e in other_seed.manifest.tensors.items()} != scales[0]


def test_fits_scales_that_are_far_off(pair):
    """Scales set to three times their data-free value: refinement brings them down and the KL falls."""
    delta = _compress(pair, None, "bitdelta", refine=False)
    for entry in delta.manifest.tensors.values():
        if "scale" in entry.params:
            entry.params["scale"] *= 3.0
    off = {n: e.params["scale"] for n, e in delta.manifest.tensors.items() if "scale" in e.params}
    settings = RefineSettings(steps=30, lr=0.1, batch_size=4)
    report = refine_scales(
        delta, open_checkpoint(pair["base"]), pair["ft"], _windows(pair), settings, torch.device("cpu")
    )
    assert report["applied"] and report["kl_after"] < 0.4 * report["kl_before"]
    shrunk = [delta.manifest.tensors[n].params["scale"] / s for n, s in off.items()]
    assert sum(g < 0.6 for g in shrunk) >= len(shrunk) // 2, shrunk


def test_default_learning_rate_falls_above_80_multipliers_per_matrix():
    assert default_lr(1, 1) == LR_FEW == 0.1
    assert default_lr(14_940, 210) == LR_FEW  # svd at 1 bit/weight: ~71 per matrix
    assert default_lr(80 * 210, 210) == LR_FEW
    assert default_lr(80 * 210 + 1, 210) == LR_MANY == 0.05
    assert default_lr(21_072, 210) == LR_MANY  # deltacome at 1 bit/weight: ~100 per matrix
    assert default_lr(5, 0) == LR_FEW  # no matrix: nothing to divide by


def test_report_names_the_rate_used_given_or_default(pair):
    chosen = _compress(pair, None, "svd", refine=True).manifest.stats[STATS_KEY]
    multipliers = chosen["sign_scales"] + chosen["components"]
    assert chosen["lr_default"] is True and chosen["lr"] == default_lr(multipliers, chosen["tensors"])
    given = _compress(pair, None, "svd", refine=True, refine_lr=0.03).manifest.stats[STATS_KEY]
    assert given["lr_default"] is False and given["lr"] == 0.03
    assert given["kl_fitted"] != chosen["kl_fitted"]  # the rate given is the rate used


def test_many_multipliers_per_matrix_take_the_smaller_default_rate(pair, monkeypatch):
    from deltakit.core import refine

    few = _compress(pair, None, "svd", refine=True).manifest.stats[STATS_KEY]
    assert few["lr"] == LR_FEW  # the tiny model's svd holds fewer than 80 components per matrix
    monkeypatch.setattr(refine, "MANY_MULTIPLIERS", 0)  # every count is now "many"
    many = _compress(pair, None, "svd", refine=True).manifest.stats[STATS_KEY]
    assert many["lr"] == LR_MANY and many["lr_default"] is True
    assert many["kl_fitted"] != few["kl_fitted"]


def test_missing_data_is_one_line(pair):
    with pytest.raises(UsageError, match=r"data=") as info:
        deltakit.compress(pair["base"], pair["ft"], None, method="bitdelta", refine_scales=True)
    assert "\n" not in str(info.value)


def test_codec_without_scale_is_refused_naming_those_with_one(pair):
    for name in ("bitdelta", "dqrelo", "svd", "deltacome", "lillama"):
        assert supports_refinement(get_codec(name)), name
    for name in ("dare", "lossless"):
        assert not supports_refinement(get_codec(name)), name
    assert {"bitdelta", "deltacome", "dqrelo", "svd"} <= set(refinable_codecs())
    with pytest.raises(UsageError, match=r"dare has neither.*bitdelta, deltacome") as info:
        deltakit.compress(
            pair["base"], pair["ft"], None, method="dare", refine_scales=True, data=[pair["text"]], **CAL
        )
    assert "\n" not in str(info.value)


def test_component_scales_need_an_in_memory_delta(pair, tmp_path):
    _compress(pair, tmp_path / "svd", "svd", refine=False)
    settings = RefineSettings(steps=1, lr=0.05, batch_size=4)
    with pytest.raises(UsageError, match=r"in-memory delta"):
        refine_scales(
            load_delta(tmp_path / "svd"), open_checkpoint(pair["base"]), pair["ft"], _windows(pair),
            settings, torch.device("cpu"),
        )  # fmt: skip


def test_bad_settings_and_in_memory_models_are_refused(pair):
    with pytest.raises(UsageError, match=r"refine_steps=0 is not valid"):
        _compress(pair, None, "bitdelta", refine=True, refine_steps=0)
    with pytest.raises(UsageError, match=r"refine_lr=nan is not valid"):
        _compress(pair, None, "bitdelta", refine=True, refine_lr=float("nan"))
    state = {"w": torch.zeros(4, 4)}
    with pytest.raises(UsageError, match=r"checkpoint directories"):
        deltakit.compress(
            state, {"w": torch.ones(4, 4)}, None, method="bitdelta", refine_scales=True, data=[pair["text"]]
        )


def test_non_finite_scale_is_refused(pair, monkeypatch):
    from deltakit.core import refine

    def blow_up(model, student, windows, settings, progress):
        with torch.no_grad():
            student.g[1] = float("nan")

    monkeypatch.setattr(refine, "_fit", blow_up)
    delta = _compress(pair, None, "svd", refine=False)
    before = {n: e.params for n, e in delta.manifest.tensors.items()}
    settings = RefineSettings(steps=1, lr=0.05, batch_size=4)
    with pytest.raises(NonFiniteError, match=r"scale of .* is NaN or Inf"):
        refine_scales(
            delta, open_checkpoint(pair["base"]), pair["ft"], _windows(pair), settings, torch.device("cpu")
        )
    assert {n: e.params for n, e in delta.manifest.tensors.items()} == before
    assert STATS_KEY not in delta.manifest.stats


def test_cli_end_to_end(pair, tmp_path, capsys):
    out = tmp_path / "delta"
    args = ("compress", "--method", "dqrelo", "--base", str(pair["base"]), str(pair["ft"]), "-o", str(out))
    cal = ("--data", str(pair["text"]), "--tokens", "1024", "--seq-len", "64")
    code, stdout, _ = _run(capsys, *args, *cal, "--refine-scales", "--refine-steps", "5", "--json")
    assert code == 0
    report = json.loads(stdout)["stats"][STATS_KEY]
    assert report["steps"] == 5 and report["kl_after"] <= report["kl_before"]

    code, stdout, _ = _run(capsys, "inspect", str(out), "--json", "--no-tensors")
    assert code == 0 and json.loads(stdout)["stats"][STATS_KEY] == report
    code, stdout, _ = _run(capsys, "inspect", str(out), "--no-tensors")
    assert code == 0 and f"scales refined on 1024 tokens, 5 steps, lr {report['lr']:.4g} (default)," in stdout
    assert report["lr_default"] is True
    code, stdout, _ = _run(capsys, "verify", str(out), "--base", str(pair["base"]), "--json")
    assert code == 0 and json.loads(stdout)["ok"]
    code, stdout, _ = _run(capsys, "apply", str(pair["base"]), str(out), "-o", str(tmp_path / "m"), "--json")
    assert code == 0 and json.loads(stdout)["tensors"] > 0
    assert load_delta(out).manifest.stats[STATS_KEY] == report

    code, _, err = _run(capsys, *args[:-2], "-o", str(tmp_path / "x"), "--refine-scales")
    assert code == 2 and "--refine-scales" in err and "--data FILE_OR_DIR" in err
    assert len(err.strip().splitlines()) == 1
    code, _, err = _run(
        capsys, *args[:-2], "-o", str(tmp_path / "y"), *cal, "--refine-scales", "--refine-steps", "0"
    )
    assert code == 2 and "--refine-steps 0 is not valid" in err


def test_tied_embeddings_refine_the_shared_matrix(tmp_path):
    """A tied lm_head is stored once (as the embedding); its refined scale acts on both uses."""
    base = make_llama(tmp_path / "base", layers=1, tie=True)
    tied = {"base": base, "ft": make_finetune(base, tmp_path / "ft", scale=1.0)}
    tied["text"] = write_text(tmp_path / "cal.txt", 40)
    kls = {}
    for name, refine in (("plain", False), ("refined", True)):
        delta = _compress(tied, tmp_path / name, "bitdelta", refine=refine)
        assert "lm_head.weight" not in delta.manifest.tensors
        deltakit.apply(base, tmp_path / name, tmp_path / f"{name}-model")
        kls[name] = _kl_to_finetune(tied, tmp_path / f"{name}-model", _windows(tied))
    assert delta.manifest.stats[STATS_KEY]["kl_after"] == pytest.approx(kls["refined"], rel=0.05)
    assert kls["refined"] < kls["plain"]


def test_data_free_scales_stay_when_the_fit_does_not_help(pair, monkeypatch):
    """A fit that ends worse than it started leaves the data-free scales in place and says so."""
    from deltakit.core import refine

    def worse(model, student, windows, settings, progress):
        with torch.no_grad():
            student.m.fill_(2.0)  # every scale tripled

    monkeypatch.setattr(refine, "_fit", worse)
    delta = _compress(pair, None, "bitdelta", refine=False)
    before = {n: e.params.get("scale") for n, e in delta.manifest.tensors.items()}
    settings = RefineSettings(steps=1, lr=0.05, batch_size=4)
    report = refine_scales(
        delta, open_checkpoint(pair["base"]), pair["ft"], _windows(pair), settings, torch.device("cpu")
    )
    assert not report["applied"] and report["kl_fitted"] > report["kl_before"]
    assert report["kl_after"] == report["kl_before"]
    assert report["max_relative_change"] == pytest.approx(2.0)
    assert {n: e.params.get("scale") for n, e in delta.manifest.tensors.items()} == before


def test_inspect_survives_a_malformed_refinement_report(pair, tmp_path, capsys):
    out = tmp_path / "delta"
    _compress(pair, out, "bitdelta", refine=False)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stats"][STATS_KEY] = {"kl_before": "x", "tokens": [1], "applied": "yes"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, _ = _run(capsys, "inspect", str(out), "--no-tensors")
    assert code == 0
    assert "scales refined on - tokens, - steps, lr -, - matrices: calibration KL - -> -, data-free" in stdout
