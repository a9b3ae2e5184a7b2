"""Prefetching, swap accounting and the mixed-batch cost profile change no output."""

from __future__ import annotations

import pytest
import torch
from test_runtime_support import cached_fleet

from deltakit.runtime import HotSwapRuntime, MultiDeltaExecutor
from deltakit.runtime.multidelta import row_selector


@pytest.fixture(scope="module")
def fleet() -> dict:
    return cached_fleet("llama")


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_prefetch_reads_ahead_and_the_swap_gives_the_same_bits(fleet):
    rt = HotSwapRuntime.from_pretrained(fleet["base"], host_cache_bytes=0, device_cache_bytes=0)
    for name, path in fleet["delta"].items():
        rt.add_delta(name, path)  # checked once; nothing stays cached (budget 0)
    plain = rt.activate("dqrelo-0")
    assert not plain.prefetched and plain.read_bytes > 0
    expected = _state(rt.model)
    rt.activate(None)

    thread = rt.prefetch(["dqrelo-0", None, "no-such-delta"])
    assert thread is not None
    thread.join(timeout=60)
    ahead = rt.activate("dqrelo-0")
    assert ahead.prefetched and ahead.read_bytes == 0
    assert rt.prefetcher.started == 1 and rt.prefetcher.used == 1
    got = _state(rt.model)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    rt.activate(None)
    again = rt.activate("dqrelo-0")  # nothing read ahead this time: read from disk again
    assert not again.prefetched and again.read_bytes == plain.read_bytes


def test_prefetch_skips_cached_deltas(fleet):
    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    rt.add_delta("svd-2", fleet["delta"]["svd-2"])
    assert rt.prefetch(["svd-2"]) is None and rt.prefetcher.started == 0
    stats = rt.activate("svd-2")
    assert stats.host_cache_hit and stats.read_bytes == 0


def test_row_groups_are_slices_when_consecutive():
    assert row_selector([2, 3, 4]) == slice(2, 5)
    assert torch.equal(row_selector([0, 2]), torch.tensor([0, 2]))


@torch.no_grad()
def test_cost_profile_splits_sign_and_low_rank_parts_without_changing_logits(fleet):
    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    for name in ("dqrelo-0", "svd-2"):
        rt.add_delta(name, fleet["delta"][name])
    ids = torch.randint(0, rt.model.config.vocab_size, (4, 6), generator=torch.Generator().manual_seed(1))
    assignment = ["dqrelo-0", "dqrelo-0", None, "svd-2"]
    plain = MultiDeltaExecutor(rt)
    with plain.assign(assignment):
        reference = rt.model(ids).logits
    profiled = MultiDeltaExecutor(rt, profile=True)
    with profiled.assign(assignment):
        logits = rt.model(ids).logits
    assert torch.equal(logits, reference)
    costs = profiled.costs
    assert costs["sign_s"] > 0 and costs["low_rank_s"] > 0
    assert costs["hooks_s"] >= costs["sign_s"] + costs["low_rank_s"]
    assert plain.costs["hooks_s"] == 0.0  # not profiled
    profiled.reset_costs()
    assert set(profiled.costs.values()) == {0.0}


def test_a_swap_plan_is_kept_per_copy_and_rebuilt_when_a_parameter_moves(fleet, monkeypatch):
    """The checked single-pass writes of a cached copy are reused by its next swap (same bits); a parameter
    whose storage moved makes a new plan, written into the new storage."""
    import deltakit.runtime.hotswap as hotswap

    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    rt.add_delta("dqrelo-0", fleet["delta"]["dqrelo-0"])
    built = []
    original = hotswap.fused_batch
    monkeypatch.setattr(
        hotswap, "fused_batch", lambda writes: (built.append(len(writes)), original(writes))[1]
    )
    rt.activate("dqrelo-0")
    expected = _state(rt.model)
    plan = rt.host_delta("dqrelo-0")[0].swap_plan
    assert len(built) == 1 and built[0] > 0 and plan.fused
    rt.activate(None)
    rt.activate("dqrelo-0")
    assert len(built) == 1 and rt.host_delta("dqrelo-0")[0].swap_plan is plan
    assert all(torch.equal(p, expected[n]) for n, p in rt.model.named_parameters())

    rt.activate(None)
    moved = next(c for c in plan.fused)
    param = rt.resident.param(moved)
    param.data = param.data.clone()  # new storage: the kept plan would write into the old one
    rt.activate("dqrelo-0")
    assert len(built) == 2 and rt.host_delta("dqrelo-0")[0].swap_plan is not plan
    assert all(torch.equal(p, expected[n]) for n, p in rt.model.named_parameters())
