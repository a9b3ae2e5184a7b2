"""Calibration-weighted rate–distortion allocation: input-energy weights from the base model's activations."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import fixtures_models as fm
import pytest
import torch
from fixtures_tokenizer import save_char_tokenizer
from test_cli import run

import deltakit
from deltakit.codecs.registry import get_codec
from deltakit.core import activations
from deltakit.core import allocation as alloc
from deltakit.core.activations import checkpoint_names, input_energy, linear_modules, normalised
from deltakit.core.inspect import inspect_delta
from deltakit.errors import NonFiniteError, TensorMismatchError, UsageError
from deltakit.models.checkpoint import open_checkpoint

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


def _text(words: int = 600, seed: int = 0) -> str:
    """Deterministic English-like text (the character tokenizer gives one token per character)."""
    vocab = ("the", "a", "delta", "base", "model", "weight", "layer", "error", "byte", "token", "rank")
    vocab += ("matrix", "input", "output", "fleet")
    rng = random.Random(seed)
    return " ".join(rng.choice(vocab) for _ in range(words)) + ".\n"


def _save_pair(root: Path, arch: str, *, loud: float = 1.0) -> tuple[Path, Path]:
    """fp32 base (with a character tokenizer) and fine-tune; ``loud`` scales the second block's MLP input
    norm in both, so that block's MLP sees much larger activations while every matrix delta is the same."""
    model = fm.build_model(arch, 0)
    if loud != 1.0:
        with torch.no_grad():
            model.model.layers[1].post_attention_layernorm.weight.mul_(loud)
    base = save_char_tokenizer(fm.save_model(model, root / "base", torch.float32))
    fm.perturb_model_(model, 1000)
    return base, fm.save_model(model, root / "ft", torch.float32)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    data = root / "calib.txt"
    data.write_text(_text())
    return {
        "data": data,
        "llama": _save_pair(root / "llama", "llama"),
        "loud": _save_pair(root / "loud", "llama", loud=20.0),
        "gpt2": _save_pair(root / "gpt2", "gpt2"),
    }


CAL = {"tokens": 512, "seq_len": 32}
#: the rd allocation weighted on the calibration text (opt-in)
WEIGHTED = {**CAL, "weight_allocation": True}


def _svd(base, ft, **kw):
    return deltakit.compress(base, ft, method="svd", config={"factor_bits": 4}, bits_per_weight=1.0, **kw)


def _allocation(delta) -> dict[str, dict]:
    return {n: e.params["allocation"] for n, e in delta.manifest.tensors.items() if e.kind == "encoded"}


def _same(a, b, path: str = "") -> str | None:
    """Where ``a`` and ``b`` differ (None when they match), ignoring what depends on the CPU's float
    kernels: stored-tensor digests are compared by key, floats to a relative 1e-6 (choices, bytes and
    ranks exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(set(a) ^ set(b))}"
        for key in a:
            if key == "stored":
                if sorted(a[key]) != sorted(b[key]):
                    return f"{path}/stored"
                continue
            found = _same(a[key], b[key], f"{path}/{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: lengths {len(a)} != {len(b)}"
        return next((f for f in (_same(x, y, path) for x, y in zip(a, b, strict=True)) if f), None)
    if isinstance(a, float) and isinstance(b, float):
        return None if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) else f"{path}: {a} != {b}"
    return None if a == b and type(a) is type(b) else f"{path}: {a!r} != {b!r}"


def test_data_free_rd_deltas_match_the_unweighted_allocator():
    """Every allocation choice (option, rank, bytes) equals the golden record of the unweighted
    allocator, its errors to a relative 1e-6; the stored digests are compared only on the machine that wrote
    them, since another CPU's SVD kernels may round a few codes differently."""
    golden = json.loads(GOLDEN.read_text())
    base, ft = golden_pair()
    # the record was written before exact-product scales (factor_exact_products=False writes as then)
    for method, config in (("svd", {"factor_bits": 4, "factor_exact_products": False}), ("deltacome", {})):
        delta = deltakit.compress(
            base, ft, method=method, config=config, bits_per_weight=1.0, allocation="rd"
        )
        record = golden_record(delta)
        assert _same(record, golden[method]) is None, (method, _same(record, golden[method]))
        assert "allocation_weighting" not in record["stats"]


def test_weights_are_positive_finite_and_recorded(calib):
    base, ft = calib["llama"]
    delta = _svd(base, ft, allocation="rd", data=[calib["data"]], **WEIGHTED)
    stats = delta.manifest.stats
    assert stats["allocation_weighting"] == "calibration" and stats["calibration_tokens"] == 512
    info = _allocation(delta)
    weights = {n: i["weight"] for n, i in info.items()}
    assert all(math.isfinite(w) and w > 0 for w in weights.values())
    # the untied lm_head and the block linears were measured; the embedding was not and weighs the mean (1)
    assert info["model.embed_tokens.weight"]["input_energy"] is None
    assert weights["model.embed_tokens.weight"] == 1.0
    measured = {n: w for n, w in weights.items() if info[n]["input_energy"] is not None}
    assert len(measured) == len(weights) - 1 and "lm_head.weight" in measured
    assert sum(measured.values()) / len(measured) == pytest.approx(1.0, rel=1e-3)
    rows = {r["name"]: r for r in inspect_delta(delta)["tensors"] if r["kind"] == "encoded"}
    assert {n: r["allocation"]["weight"] for n, r in rows.items()} == weights


def test_gpt2_conv1d_layers_are_measured_and_tied_embeddings_weigh_the_mean(calib):
    base, ft = calib["gpt2"]
    info = _allocation(_svd(base, ft, allocation="rd", data=[calib["data"]], **WEIGHTED))
    unmeasured = {n for n, i in info.items() if i["input_energy"] is None}
    assert unmeasured == {"transformer.wte.weight", "transformer.wpe.weight"}  # lm_head is tied to wte
    assert all(info[n]["weight"] == 1.0 for n in unmeasured)
    for suffix in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"):
        assert info[f"transformer.h.1.{suffix}"]["input_energy"] > 0, suffix


def test_input_energy_is_the_mean_square_of_each_layers_input():
    from transformers.pytorch_utils import Conv1D

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 6)
            self.proj = torch.nn.Linear(6, 5)
            self.conv = Conv1D(3, 5)  # (in 5, out 3)

        def forward(self, input_ids, use_cache=False):
            return self.conv(self.proj(self.embed(input_ids)))

    torch.manual_seed(0)
    model = Tiny()
    ids = torch.randint(0, 16, (9, 7))  # 9 windows: three forward batches of up to 4
    energy = input_energy(model, ids, torch.device("cpu"))
    with torch.no_grad():
        x = model.embed(ids)
        expected = {"proj": x.double().pow(2).mean(), "conv": model.proj(x).double().pow(2).mean()}
    assert energy.keys() == expected.keys()
    for name, value in expected.items():
        assert energy[name] == pytest.approx(float(value), rel=1e-9), name
    assert not model.proj._forward_pre_hooks and not model.conv._forward_pre_hooks  # hooks removed


def test_module_names_map_to_checkpoint_names_with_or_without_the_model_prefix():
    model = fm.build_model("gpt2")
    modules = [n for n, _ in linear_modules(model)]
    assert "transformer.h.0.attn.c_attn" in modules  # Conv1D layers are found
    full = {f"{n}.weight" for n in modules}
    assert checkpoint_names(model, modules, full) == {n: f"{n}.weight" for n in modules}
    short = {"h.0.attn.c_attn.weight", "h.1.mlp.c_proj.weight"}
    assert checkpoint_names(model, modules, short) == {
        "transformer.h.0.attn.c_attn": "h.0.attn.c_attn.weight",
        "transformer.h.1.mlp.c_proj": "h.1.mlp.c_proj.weight",
    }


def test_normalised_weights_have_mean_one_and_stay_positive():
    weights = normalised({"a": 4.0, "b": 0.0, "c": 2.0, "d": None})
    assert weights["a"] == pytest.approx(2.0) and weights["c"] == pytest.approx(1.0)
    assert 0 < weights["b"] < 1e-5 and weights["d"] == 1.0
    with pytest.raises(NonFiniteError, match="not finite"):
        normalised({"a": float("inf")})


def test_a_layer_with_louder_inputs_gets_at_least_as_many_bytes(calib):
    quiet_base, quiet_ft = calib["llama"]
    loud_base, loud_ft = calib["loud"]
    mlp = ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight")
    reference = "model.layers.0.mlp.gate_proj.weight"
    free = _allocation(_svd(quiet_base, quiet_ft, allocation="rd"))
    quiet = _allocation(_svd(quiet_base, quiet_ft, allocation="rd", data=[calib["data"]], **WEIGHTED))
    loud = _allocation(_svd(loud_base, loud_ft, allocation="rd", data=[calib["data"]], **WEIGHTED))
    for name in mlp:  # the norm scales these layers' inputs by 20, their input energy by 400
        relative = (loud[name]["weight"] / loud[reference]["weight"]) / (
            quiet[name]["weight"] / quiet[reference]["weight"]
        )
        assert relative == pytest.approx(400, rel=0.01), name
        assert loud[name]["bytes"] >= quiet[name]["bytes"] and loud[name]["bytes"] >= free[name]["bytes"]
    assert sum(loud[n]["bytes"] for n in mlp) > sum(quiet[n]["bytes"] for n in mlp)


def _survey(base, ft):
    codec = get_codec("svd")
    cfg = codec.config_class.from_dict({"factor_bits": 4})
    found = alloc.survey(
        codec, cfg, open_checkpoint(base), open_checkpoint(ft), (), torch.device("cpu"), True
    )
    return codec, cfg, found


def test_raising_one_matrix_weight_never_takes_bytes_from_it(calib):
    codec, cfg, found = _survey(*calib["llama"])
    target = found.fp16_bytes // 16
    names = list(found.shapes)
    ones = dict.fromkeys(names, 1.0)
    before = alloc.plan_rd(codec, cfg, found, target, alloc.Weighting(ones, dict.fromkeys(names))).info
    gained = 0
    for name in names[::3]:
        for factor in (3.0, 30.0, 300.0):
            weighting = alloc.Weighting({**ones, name: factor}, dict.fromkeys(names))
            after = alloc.plan_rd(codec, cfg, found, target, weighting).info
            assert after[name]["bytes"] >= before[name]["bytes"], (name, factor)
            gained += after[name]["bytes"] > before[name]["bytes"]
    assert gained > 0


def test_random_weights_never_exceed_the_budget(calib):
    codec, cfg, found = _survey(*calib["llama"])
    names = list(found.shapes)
    g = torch.Generator().manual_seed(4)
    for k in (1, 3, 8):
        target = found.fp16_bytes * k // 64
        w = torch.exp(4 * torch.randn(len(names), generator=g)).tolist()  # weights spread over e^±8
        plan = alloc.plan_rd(codec, cfg, found, target, alloc.Weighting(dict(zip(names, w, strict=True)), {}))
        total = sum(i["bytes"] for i in plan.info.values())
        assert 0.99 * target <= total <= target, k
        assert all(i["weight"] > 0 for i in plan.info.values())


def test_a_weighting_missing_a_matrix_is_refused(calib):
    codec, cfg, found = _survey(*calib["llama"])
    with pytest.raises(UsageError, match="no weight for"):
        alloc.plan_rd(codec, cfg, found, found.fp16_bytes // 16, alloc.Weighting({}, {}))


@pytest.mark.parametrize("target", [{"bits_per_weight": 1.0}, {"bits_per_weight": 0.5}, {"size": 40_000}])
def test_weighted_budgets_are_met_within_one_percent_and_never_exceeded(calib, target):
    base, ft = calib["loud"]
    delta = deltakit.compress(
        base,
        ft,
        method="svd",
        config={"factor_bits": 4},
        allocation="rd",
        data=[calib["data"]],
        **WEIGHTED,
        **target,
    )
    stats = delta.manifest.stats
    assert stats["allocation_weighting"] == "calibration"
    if "size" in target:
        assert 0.99 * target["size"] <= stats["stored_bytes"] <= target["size"]
    else:
        planned = target["bits_per_weight"] * (stats["fp16_delta_bytes"] // 2) / 8
        assert 0.99 * planned <= stats["encoded_bytes"] + stats["param_bytes"] <= planned


def test_weighted_allocation_is_deterministic_under_a_seed(calib):
    base, ft = calib["llama"]
    runs = [_svd(base, ft, data=[calib["data"]], seed=3, **WEIGHTED) for _ in range(2)]
    assert runs[0].manifest.stats == runs[1].manifest.stats
    assert runs[0].manifest.tensors == runs[1].manifest.tensors
    for name, entry in runs[0].manifest.tensors.items():
        if entry.kind == "encoded":
            ours, theirs = runs[0].codec_tensors(name), runs[1].codec_tensors(name)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_uniform_allocation_accepts_data_and_ignores_it(calib):
    base, ft = calib["llama"]
    plain = _svd(base, ft, allocation="uniform")
    with_data = _svd(base, ft, allocation="uniform", data=[calib["data"]], **CAL)
    assert with_data.manifest.stats == plain.manifest.stats
    assert "allocation_weighting" not in with_data.manifest.stats
    assert golden_record(with_data) == golden_record(plain)


def test_rd_with_data_is_data_free_unless_weighting_is_asked_for(calib):
    """Input-energy weighting lowered KL on the fleet, so data alone does not switch it on."""
    base, ft = calib["llama"]
    plain = _svd(base, ft, allocation="rd")
    with_data = _svd(base, ft, allocation="rd", data=[calib["data"]], **CAL)
    assert "allocation_weighting" not in with_data.manifest.stats
    assert golden_record(with_data) == golden_record(plain)
    weighted = _svd(base, ft, allocation="rd", data=[calib["data"]], **WEIGHTED)
    assert weighted.manifest.stats["allocation_weighting"] == "calibration"


def test_weighting_without_data_or_with_the_uniform_allocation_is_refused(calib, capsys, tmp_path):
    base, ft = calib["llama"]
    with pytest.raises(UsageError, match=r"weight_allocation=True .* pass data=") as err:
        _svd(base, ft, allocation="rd", weight_allocation=True)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="weights the rd allocation; allocation is 'uniform'"):
        _svd(base, ft, allocation="uniform", data=[calib["data"]], **WEIGHTED)
    args = ["compress", "--base", str(base), str(ft), "-o", str(tmp_path / "d"), "--method", "svd"]
    code, _, stderr = run(capsys, *args, "--bits-per-weight", "1", "--weight-allocation")
    assert code == UsageError.exit_code and len(stderr.strip().splitlines()) == 1
    assert "--weight-allocation" in stderr and "weight_allocation=True" not in stderr


def test_bad_calibration_input_is_a_one_line_error(calib, tmp_path):
    base, ft = calib["llama"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    cases = [
        ([tmp_path / "missing.txt"], base, "does not exist"),
        ([empty], base, "holds no text"),
        ([short], base, "fewer than the 512 requested"),
    ]
    for data, base_arg, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            _svd(base_arg, ft, allocation="rd", data=data, **WEIGHTED)
        assert "\n" not in str(err.value)
    no_tokenizer = tmp_path / "bare"
    fm.save_model(fm.build_model("llama", 0), no_tokenizer, torch.float32)
    with pytest.raises(UsageError, match="needs a tokenizer"):
        _svd(no_tokenizer, ft, allocation="rd", data=[calib["data"]], **WEIGHTED)
    state = golden_pair()
    with pytest.raises(UsageError, match="give base as a checkpoint directory"):
        _svd(*state, allocation="rd", data=[calib["data"]], **WEIGHTED)


def test_cli_compress_with_data_says_the_allocation_is_calibration_weighted(capsys, calib, tmp_path):
    base, ft = calib["llama"]
    out = tmp_path / "d"
    args = ["compress", "--base", str(base), str(ft), "-o", str(out), "--method", "svd"]
    args += [
        "--bits-per-weight",
        "1",
        "--allocation",
        "rd",
        "--data",
        str(calib["data"]),
        "--weight-allocation",
    ]
    code, stdout, stderr = run(capsys, *args, "--tokens", "512", "--seq-len", "32", "--json")
    assert code == 0, stderr
    stats = json.loads(stdout)["stats"]
    assert stats["allocation"] == "rd" and stats["allocation_weighting"] == "calibration"
    assert stats["encoded_bytes"] + stats["param_bytes"] <= stats["fp16_delta_bytes"] / 16
    code, stdout, _ = run(capsys, "inspect", str(out), "--json")
    rows = [r for r in json.loads(stdout)["tensors"] if r["kind"] == "encoded"]
    assert code == 0 and all(r["allocation"]["weight"] > 0 for r in rows)
    code, stdout, _ = run(capsys, "inspect", str(out), "--no-tensors")
    assert code == 0 and "allocation rd, calibration-weighted on 512 tokens" in stdout


def test_cli_bad_calibration_data_exits_with_one_line(capsys, calib, tmp_path):
    base, ft = calib["llama"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    args = ["compress", "--base", str(base), str(ft), "-o", str(tmp_path / "d"), "--method", "svd"]
    code, _, stderr = run(
        capsys, *args, "--bits-per-weight", "1", "--data", str(empty), "--weight-allocation"
    )
    assert code == UsageError.exit_code
    assert "holds no text" in stderr and len(stderr.strip().splitlines()) == 1


def test_only_unmeasured_matrices_changed_weighs_them_alike(calib, tmp_path):
    base, _ = calib["llama"]
    model = fm.build_model("llama", 0)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(
            0.01
            * fm.structured_delta(*model.model.embed_tokens.weight.shape, torch.Generator().manual_seed(1))
        )
    ft = fm.save_model(model, tmp_path / "ft-embed", torch.float32)
    free = _svd(base, ft, allocation="rd")
    weighted = _svd(base, ft, allocation="rd", data=[calib["data"]], **WEIGHTED)
    info = _allocation(weighted)
    assert list(info) == ["model.embed_tokens.weight"] and info["model.embed_tokens.weight"]["weight"] == 1.0
    name = "model.embed_tokens.weight"
    ours, theirs = weighted.codec_tensors(name), free.codec_tensors(name)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_linear_layers_named_unlike_the_checkpoint_are_refused(calib, monkeypatch):
    monkeypatch.setattr(activations, "checkpoint_names", lambda model, modules, known: {})
    with pytest.raises(TensorMismatchError, match="not named as the checkpoint's tensors"):
        _svd(*calib["llama"], allocation="rd", data=[calib["data"]], **WEIGHTED)
