"""The hot-swap runtime: bit-exact swaps against deltakit.apply, multi-delta batches, caches, refusals."""

from __future__ import annotations

import pytest
import torch
from test_runtime_support import applied_model, cached_fleet, foreign_delta
from transformers import AutoModelForCausalLM

from deltakit.errors import BaseMismatchError
from deltakit.runtime import ByteLRU, HotSwapRuntime, MultiDeltaExecutor


def _runtime(fleet: dict, **limits) -> HotSwapRuntime:
    rt = HotSwapRuntime.from_pretrained(fleet["base"], **limits)
    for name, path in fleet["delta"].items():
        rt.add_delta(name, path)
    return rt


def _assert_same_params(model, reference) -> None:
    ours = dict(model.named_parameters())
    for name, tensor in reference.named_parameters():
        assert torch.equal(ours[name], tensor), f"{name} differs"


def _reference(fleet: dict, name: str):
    return applied_model(fleet["base"], fleet["delta"][name], fleet["root"] / f"applied-{name}")


@pytest.mark.parametrize("kind", ["llama", "llama-bf16", "gpt2"])
def test_swaps_are_bit_exact_with_apply(kind):
    fleet = cached_fleet(kind)
    rt = _runtime(fleet)
    params_before = {n: id(p) for n, p in rt.model.named_parameters()}
    names = list(fleet["delta"])
    for name in [*names, names[0], None, names[-1], None]:
        stats = rt.activate(name)
        assert rt.active == name and stats.target == name
        if name is None:
            reference = AutoModelForCausalLM.from_pretrained(fleet["base"], dtype="auto")
        else:
            reference = _reference(fleet, name)
        _assert_same_params(rt.model, reference)
    # same parameter objects throughout (a compiled model stays valid); tied weights stay tied
    assert {n: id(p) for n, p in rt.model.named_parameters()} == params_before
    if rt.model.config.tie_word_embeddings:
        assert rt.model.lm_head.weight is rt.model.get_input_embeddings().weight


def test_swap_stats_report_bytes_and_time():
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    name = next(iter(fleet["delta"]))
    stats = rt.activate(name)
    assert stats.source is None and stats.tensors > 0
    assert stats.restored_bytes > 0 and stats.written_bytes > 0 and stats.seconds >= 0
    assert rt.activate(name).tensors == 0  # no-op swap
    assert rt.history[-1].target == name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_matches_each_merged_delta(kind):
    fleet = cached_fleet(kind)
    rt = _runtime(fleet)
    names = list(fleet["delta"])
    assignment = [names[0], None, *names, names[-1]]
    ids = torch.randint(0, 256, (len(assignment), 9), generator=torch.Generator().manual_seed(3))
    executor = MultiDeltaExecutor(rt, sign_cache_bytes=0)
    with torch.no_grad():
        with executor.assign(assignment):
            mixed = rt.model(ids).logits  # (batch, seq, vocab)
        for row, name in enumerate(assignment):
            rt.activate(name)
            merged = rt.model(ids[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], merged, rtol=1e-4, atol=1e-4)
    # hooks are gone after the block: a plain forward equals the base again
    rt.activate(None)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(fleet["base"], dtype="auto")(ids[:1]).logits
        assert torch.equal(rt.model(ids[:1]).logits, base)


def test_sign_cache_gives_the_same_logits():
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    names = list(fleet["delta"])[:2]
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    outs = []
    for budget in (0, 64 << 20):
        executor = MultiDeltaExecutor(rt, sign_cache_bytes=budget)
        with torch.no_grad(), executor.assign(names):
            outs.append(rt.model(ids).logits)
            outs.append(rt.model(ids).logits)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_small_cache_evicts_and_stays_exact():
    fleet = cached_fleet("llama")
    names = list(fleet["delta"])
    one = HotSwapRuntime.from_pretrained(fleet["base"])
    one.add_delta(names[0], fleet["delta"][names[0]])
    size = one.host_cache.get(names[0]).nbytes
    rt = _runtime(fleet, host_cache_bytes=int(size * 1.5), device_cache_bytes=int(size * 1.5))
    assert len(rt.host_cache) < len(names)  # some were evicted while loading
    for name in [*names, *names]:
        rt.activate(name)
        _assert_same_params(rt.model, _reference(fleet, name))
    assert rt.host_cache.evictions > 0 and rt.host_cache.nbytes <= rt.host_cache.limit_bytes
    assert any(not s.host_cache_hit for s in rt.history)


def test_cached_deltas_hold_their_stored_bytes_and_the_caches_count_what_they_hold():
    """A delta with 4-bit factors is held as its codes (the swap's compiled rebuild reads them), not as
    fp32 copies; the cache budgets count every tensor held, a view's tensors beyond the stored ones too."""
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    quantized = 0
    for name in fleet["delta"]:
        rt.activate(name)
        prepared = rt.host_cache.get(name)
        views = [op.view for op in prepared.ops.values() if op.view is not None]
        quantized += sum(v.quantized is not None and v.float_factors == (None, None) for v in views)
        stored = sum(t.nbytes for op in prepared.ops.values() for t in op.tensors.values())
        assert prepared.nbytes == prepared.stored_nbytes == stored, name
        _assert_same_params(rt.model, _reference(fleet, name))
    assert quantized > 0  # dqrelo and svd store 4-bit factors by default
    assert rt.host_cache.nbytes == sum(rt.host_cache.get(n).nbytes for n in fleet["delta"])
    # a view holding fp32 factors besides the stored tensors (a plug-in codec's, say) counts them
    import dataclasses

    from deltakit.codecs.base import FactoredView

    name = next(n for n in fleet["delta"] if n.startswith("dqrelo"))
    op = next(
        op for op in rt.host_cache.get(name).ops.values() if op.view is not None and op.view.has_low_rank
    )
    v = op.view
    held = dataclasses.replace(op, view=FactoredView(v.shape, v.signs, v.scale, v.up, v.down))
    assert held.nbytes == op.stored_nbytes + v.up.nbytes + v.down.nbytes


def test_delta_from_another_base_is_refused():
    fleet = cached_fleet("llama")
    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    with pytest.raises(BaseMismatchError, match="not from the served base"):
        rt.add_delta("foreign", foreign_delta(fleet["root"]))
    assert rt.names() == []


def test_remove_active_delta_restores_base():
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    name = next(iter(fleet["delta"]))
    rt.activate(name)
    rt.remove_delta(name)
    assert rt.active is None and name not in rt.names()
    _assert_same_params(rt.model, AutoModelForCausalLM.from_pretrained(fleet["base"], dtype="auto"))


def test_byte_lru():
    cache: ByteLRU[bytes] = ByteLRU(10, len)
    assert cache.put("a", b"1234") and cache.put("b", b"1234")
    cache.get("a")
    assert cache.put("c", b"1234")  # evicts b, the least recently used
    assert cache.keys() == ["a", "c"] and cache.nbytes == 8
    assert not cache.put("huge", b"x" * 11) and "huge" not in cache
