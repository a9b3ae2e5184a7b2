"""Size targets (size=, bits_per_weight=) with uniform and rate-distortion allocation across tensors."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import run
from test_runtime_support import build_llama, finetune, save_model

import deltakit
from deltakit.codecs.registry import get_codec
from deltakit.core import allocation as alloc
from deltakit.core.decode import Decoder
from deltakit.core.inspect import inspect_delta
from deltakit.errors import BudgetError, UsageError
from deltakit.models.checkpoint import open_checkpoint
from deltakit.runtime import HotSwapRuntime, MultiDeltaExecutor

CASES = [
    ("svd", {"factor_bits": 4}, "rd"),
    ("svd", {"factor_bits": 3}, "uniform"),
    ("dqrelo", {"factor_bits": 4}, "rd"),
    ("deltacome", {}, "rd"),
    ("dare", {}, "uniform"),
]


def _coded(delta) -> int:
    s = delta.manifest.stats
    return s["encoded_bytes"] + s["param_bytes"]


@pytest.mark.parametrize("method,config,allocation", CASES)
def test_bits_per_weight_is_met_within_one_percent_and_never_exceeded(llama_pair, method, config, allocation):
    base, ft = llama_pair
    bpw = 1.5 if method == "dqrelo" else 1.0
    delta = deltakit.compress(
        base, ft, method=method, config=config, bits_per_weight=bpw, allocation=allocation
    )
    stats = delta.manifest.stats
    weights = stats["fp16_delta_bytes"] // 2
    target = bpw * weights / 8
    assert stats["allocation"] == allocation
    assert 0.99 * target <= _coded(delta) <= target


@pytest.mark.parametrize("method,config,allocation", CASES[:4])
def test_size_counts_everything_stored(llama_pair, method, config, allocation):
    base, ft = llama_pair
    fp16 = deltakit.compress(base, ft, method="svd", rank=1).manifest.stats
    size = fp16["passthrough_bytes"] + fp16["fp16_delta_bytes"] // 10
    delta = deltakit.compress(base, ft, method=method, config=config, size=size, allocation=allocation)
    stored = delta.manifest.stats["stored_bytes"]
    assert 0.99 * size <= stored <= size


def test_allocated_delta_decodes_and_inspect_shows_the_allocation(llama_pair, tmp_path):
    base, ft = llama_pair
    out = tmp_path / "d"
    deltakit.compress(base, ft, out, method="svd", config={"factor_bits": 3}, bits_per_weight=0.5)
    delta = deltakit.load_delta(out)
    decoder = Decoder.of(delta)
    rows = [r for r in inspect_delta(delta)["tensors"] if r["kind"] == "encoded"]
    assert rows and all(r["allocation"]["bits"] == 3 for r in rows)
    ranks = {r["allocation"]["rank"] for r in rows}
    assert len(ranks) > 1  # not the same rank everywhere
    for row in rows:
        info = row["allocation"]
        assert info["option"].startswith("rank ") and 0 <= info["actual_error"] <= 1.0
        assert info["predicted_error"] == pytest.approx(info["actual_error"], abs=0.15)
        decoder.encoded(row["name"])  # stored names match what the codec declares


def test_rd_allocation_beats_uniform_at_the_same_bytes(llama_pair):
    base, ft = llama_pair
    b, t = open_checkpoint(base), open_checkpoint(ft)

    def total_sq_error(allocation: str) -> float:
        delta = deltakit.compress(
            base, ft, method="svd", config={"factor_bits": 4}, bits_per_weight=0.5, allocation=allocation
        )
        dec = Decoder.of(delta)
        err = 0.0
        for name, entry in delta.manifest.tensors.items():
            if entry.kind == "encoded":
                d = t.get(name).float() - b.get(name).float()
                err += float(((dec.codec.decode(dec.encoded(name)) - d) ** 2).sum())
        return err

    assert total_sq_error("rd") < total_sq_error("uniform")


def test_more_bytes_never_give_a_larger_planned_error(llama_pair):
    base, ft = llama_pair
    codec = get_codec("svd")
    cfg = codec.config_class.from_dict({"factor_bits": 4})
    found = alloc.survey(
        codec, cfg, open_checkpoint(base), open_checkpoint(ft), (), torch.device("cpu"), True
    )
    errors = []
    for k in range(1, 12):
        plan = alloc.plan_rd(codec, cfg, found, found.fp16_bytes * k // 64)
        errors.append(sum(i["predicted_error"] ** 2 * found.norms2[n] for n, i in plan.info.items()))
    assert all(later <= earlier * (1 + 1e-9) for earlier, later in zip(errors, errors[1:], strict=False))


def test_allocation_is_deterministic(llama_pair):
    base, ft = llama_pair
    runs = [
        deltakit.compress(base, ft, method="dqrelo", config={"factor_bits": 3}, bits_per_weight=1.25, seed=3)
        for _ in range(2)
    ]
    assert runs[0].manifest.tensors == runs[1].manifest.tensors
    for name, entry in runs[0].manifest.tensors.items():
        if entry.kind == "encoded":
            ours, theirs = runs[0].codec_tensors(name), runs[1].codec_tensors(name)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_size_targets_refuse_conflicts_and_impossible_sizes(llama_pair):
    base, ft = llama_pair
    with pytest.raises(UsageError, match="give one size"):
        deltakit.compress(base, ft, method="svd", ratio=0.1, size=10_000)
    with pytest.raises(UsageError, match="allocation"):
        deltakit.compress(base, ft, method="svd", bits_per_weight=1.0, allocation="greedy")
    with pytest.raises(BudgetError, match="stored exactly"):
        deltakit.compress(base, ft, method="svd", size=100)
    for allocation in ("uniform", "rd"):  # its sign bits alone are 1 bit per weight
        with pytest.raises(BudgetError, match=r"bits per weight.*a codec that goes lower"):
            deltakit.compress(base, ft, method="dqrelo", bits_per_weight=1.0, allocation=allocation)
    with pytest.raises(BudgetError, match=r"needs at least \d+ bytes \(1\.\d+ bits per weight\)"):
        deltakit.compress(base, ft, method="dqrelo", bits_per_weight=0.5, allocation="rd")


@pytest.mark.parametrize("flag,value", [("--size", "60KiB"), ("--size", "61440"), ("--bits-per-weight", "1")])
def test_cli_size_flags(capsys, llama_pair, tmp_path, flag, value):
    base, ft = llama_pair
    out = tmp_path / "d"
    args = ["compress", "--base", str(base), str(ft), "-o", str(out), "-m", "svd", "--set", "factor_bits=4"]
    code, stdout, stderr = run(capsys, *args, flag, value)
    assert code == 0, stderr
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    if flag == "--size":
        assert stats["stored_bytes"] <= 61440
    else:
        assert stats["encoded_bytes"] <= stats["fp16_delta_bytes"] / 16


def test_cli_refuses_a_malformed_size(capsys, llama_pair, tmp_path):
    base, ft = llama_pair
    code, _, stderr = run(
        capsys, "compress", "--base", str(base), str(ft), "-o", str(tmp_path / "d"), "--size", "12XB"
    )
    assert code != 0 and "not a size" in stderr


def test_mixed_batch_equals_merged_weights_for_quantized_factor_deltas(tmp_path):
    base = save_model(build_llama(torch.float32), tmp_path / "base")
    deltas = {}
    for i, (method, config) in enumerate(
        [("svd", {"factor_bits": 4}), ("dqrelo", {"factor_bits": 3}), ("deltacome", {})]
    ):
        ft = finetune(base, tmp_path / f"ft-{i}", seed=200 + i)
        deltas[method] = tmp_path / f"delta-{method}"
        deltakit.compress(base, ft, deltas[method], method=method, config=config, bits_per_weight=1.5)
    rt = HotSwapRuntime.from_pretrained(base)
    for name, path in deltas.items():
        rt.add_delta(name, path)
    assignment = [*deltas, None, "svd"]
    ids = torch.randint(0, 256, (len(assignment), 7), generator=torch.Generator().manual_seed(5))
    executor = MultiDeltaExecutor(rt, sign_cache_bytes=0)
    with torch.no_grad():
        with executor.assign(assignment):
            mixed = rt.model(ids).logits
        for row, name in enumerate(assignment):
            rt.activate(name)
            merged = rt.model(ids[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], merged, rtol=1e-4, atol=1e-4)


def test_codecs_without_a_size_budget_refuse_a_size_target(state_pair):
    with pytest.raises(BudgetError, match="no size budget"):
        deltakit.compress(*state_pair, method="lossless", size=1 << 20)
