"""Mixed-delta batches on every path of the executor equal the merged weights of each row's delta."""

from __future__ import annotations

import pytest
import torch
from test_runtime_support import cached_fleet

import deltakit.ops.signmm as signmm
from deltakit.runtime import HotSwapRuntime, MultiDeltaExecutor
from deltakit.runtime.multidelta import STACK_TOKENS


def _runtime(fleet: dict, **kwargs) -> HotSwapRuntime:
    rt = HotSwapRuntime.from_pretrained(fleet["base"], **kwargs)
    for name, path in fleet["delta"].items():
        rt.add_delta(name, path)
    return rt


def _assignment(fleet: dict) -> list[str | None]:
    names = [n for n in fleet["delta"] if n != "lossless"]
    return [names[0], None, *names, names[0], None]  # non-consecutive rows, base rows


@torch.no_grad()
def _merged_last_logits(rt: HotSwapRuntime, ids: torch.Tensor, assignment) -> list[torch.Tensor]:
    out = []
    for row, name in enumerate(assignment):
        rt.activate(name)
        out.append(rt.model(ids[row : row + 1]).logits[0, -1])
    rt.activate(None)
    return out


@torch.no_grad()
def _mixed_prefill_then_step(
    rt, executor, ids: torch.Tensor, assignment
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt's last position (prefill) and of one cached decoding step."""
    with executor.assign(assignment):
        first = rt.model(ids[:, :-1], use_cache=True)
        step = rt.model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True)
    return first.logits[:, -1], step.logits[:, -1]


@pytest.mark.parametrize("native", [True, False])
def test_long_prefill_and_cached_steps_equal_merged_weights(monkeypatch, native):
    """Prefill over STACK_TOKENS token rows (compiled low-rank group and table-form signs, or without
    the library per-delta low rank and unpacked signs), then a one-token step (compiled group and
    tile-form signs, or the stacked low rank): both equal the merged model of each row's delta."""
    if not native:
        monkeypatch.setattr(signmm, "_tried", True)
        monkeypatch.setattr(signmm, "_library", None)
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    assignment = _assignment(fleet)
    length = max(STACK_TOKENS // len(assignment), signmm.LUT_MIN_ROWS) + 4
    ids = torch.randint(0, 256, (len(assignment), length), generator=torch.Generator().manual_seed(8))
    assert len(assignment) * (length - 1) > STACK_TOKENS and length - 1 >= signmm.LUT_MIN_ROWS
    prefill, step = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    merged_prefill = _merged_last_logits(rt, ids[:, :-1], assignment)
    merged_step = _merged_last_logits(rt, ids, assignment)
    for row in range(len(assignment)):
        torch.testing.assert_close(prefill[row], merged_prefill[row], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(step[row], merged_step[row], rtol=1e-4, atol=1e-4)


def test_bf16_model_rows_equal_merged_weights_within_bf16_rounding():
    """On a bf16 model the merged weights are rounded to bf16, so rows agree to bf16 rounding: far closer
    than the delta's own effect on the logits."""
    fleet = cached_fleet("llama-bf16")
    rt = _runtime(fleet)
    assert rt.model.dtype == torch.bfloat16
    assignment = _assignment(fleet)
    ids = torch.randint(0, 256, (len(assignment), 6), generator=torch.Generator().manual_seed(9))
    prefill, step = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    merged = _merged_last_logits(rt, ids, assignment)
    base = _merged_last_logits(rt, ids, [None] * len(assignment))
    for row, name in enumerate(assignment):
        gap = (step[row].float() - merged[row].float()).abs().max()
        if name is None:
            assert torch.equal(step[row], merged[row])
        else:
            effect = (merged[row].float() - base[row].float()).abs().max()
            assert effect > 0.1 and gap < 0.2 * effect, (name, float(gap), float(effect))


def _recorded(monkeypatch, method: str, flag) -> list[tuple[bool, bool]]:
    """Wrap ``MultiDeltaExecutor.<method>`` (plan, x, output) -> taken; returns the list of (flag(plan),
    taken) of its calls."""
    calls = []
    original = getattr(MultiDeltaExecutor, method)

    def counted(self, plan, x, result):
        taken = original(self, plan, x, result)
        calls.append((bool(flag(plan)), taken))
        return taken

    monkeypatch.setattr(MultiDeltaExecutor, method, counted)
    return calls


def _refused(monkeypatch, method: str) -> None:
    monkeypatch.setattr(MultiDeltaExecutor, method, lambda self, plan, x, result: False)


def test_low_rank_only_rows_add_into_a_bf16_output_with_the_bits_of_the_fp32_share(monkeypatch):
    """Where svd deltas' low-rank parts are a module's only shares, the compiled group reads the bf16
    activations and adds into the bf16 output directly: the same logits, bit for bit, as the fp32 copy
    of x, fp32 share and separate add. The forward's fast path (``_direct_fast``) and the general hook's
    direct path give the same logits too."""
    from deltakit.ops import lowrank_group

    if not lowrank_group.available():
        pytest.skip("needs the compiled kernel")
    fleet = cached_fleet("llama-bf16")
    rt = _runtime(fleet)
    svd = next(n for n in fleet["delta"] if n.startswith("svd"))
    assignment = [svd, None, svd, None]
    ids = torch.randint(0, 256, (len(assignment), 6), generator=torch.Generator().manual_seed(14))
    with monkeypatch.context() as patch:
        fast_calls = _recorded(patch, "_direct_fast", lambda plan: plan.low_rank_parts)
        fast = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    assert fast_calls and all(taken == low_rank for low_rank, taken in fast_calls)  # every linear layer
    _refused(monkeypatch, "_direct_fast")
    with monkeypatch.context() as patch:
        hook_calls = _recorded(patch, "_low_rank_into_output", lambda plan: plan.low_rank_parts)
        direct = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    assert any(taken for _, taken in hook_calls)
    assert all(taken == low_rank for low_rank, taken in hook_calls)
    _refused(monkeypatch, "_low_rank_into_output")
    through_share = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    for got, hooked, want in zip(fast, direct, through_share, strict=True):
        assert torch.equal(got, want) and torch.equal(hooked, want)
    base = _merged_last_logits(rt, ids, [None] * len(assignment))
    assert torch.equal(direct[1][1], base[1]) and not torch.equal(direct[1][0], base[0])


def test_the_forward_fast_path_leaves_other_inputs_to_the_general_hook(monkeypatch):
    """A non-contiguous input, or a forward that records gradients, is not the fast path's: the general
    hook takes it and gives the same output as the fast path on the contiguous input."""
    from deltakit.ops import lowrank_group

    if not lowrank_group.available():
        pytest.skip("needs the compiled kernel")
    fleet = cached_fleet("llama-bf16")
    rt = _runtime(fleet)
    svd = next(n for n in fleet["delta"] if n.startswith("svd"))
    executor = MultiDeltaExecutor(rt)
    with executor.assign([svd, None, svd, None]):
        module = next(
            m for m in rt.model.modules() if isinstance(m, torch.nn.Linear) and "forward" in m.__dict__
        )
        features = module.in_features
        x = torch.randn(4, 3, features, generator=torch.Generator().manual_seed(16)).bfloat16()
        wide = torch.zeros(4, 3, 2 * features, dtype=torch.bfloat16)
        wide[..., ::2] = x
        strided = wide[..., ::2]  # (4, 3, in), the same values, not contiguous
        assert not strided.is_contiguous()
        taken = _recorded(monkeypatch, "_direct_fast", lambda plan: True)
        with torch.no_grad():
            fast = module(x)
            from_strided = module(strided)
        with torch.enable_grad():
            with_grad = module(x)
    assert [t for _, t in taken] == [True, False, False]
    assert torch.equal(from_strided, fast) and torch.equal(with_grad.detach(), fast)
    with torch.no_grad():
        base_out = torch.nn.functional.linear(x, module.weight, module.bias)
    assert torch.equal(fast[1], base_out[1]) and not torch.equal(fast[0], base_out[0])


@pytest.mark.parametrize("dtype_fleet", ["llama-bf16", "llama"])
def test_sign_and_low_rank_rows_add_into_the_output_in_one_call_with_the_same_bits(monkeypatch, dtype_fleet):
    """Where grouped sign parts (dqrelo, bitdelta; beside svd rows and base rows) are a module's only
    shares besides low rank, one compiled call adds them all into the output: the same logits, bit for
    bit, as the fp32 copy of x, fp32 share, two group calls and separate add; the forward's fast path,
    the general hook's direct path and the profiled executor (separate calls, to time each) give the
    same logits too."""
    from deltakit.ops import lowrank_group

    if not lowrank_group.available():
        pytest.skip("needs the compiled kernel")
    fleet = cached_fleet(dtype_fleet)
    rt = _runtime(fleet)
    dqrelo = next(n for n in fleet["delta"] if n.startswith("dqrelo"))
    bitdelta = next(n for n in fleet["delta"] if n.startswith("bitdelta"))
    svd = next(n for n in fleet["delta"] if n.startswith("svd"))
    assignment = [dqrelo, None, bitdelta, svd, dqrelo]
    ids = torch.randint(0, 256, (len(assignment), 6), generator=torch.Generator().manual_seed(15))
    signed = lambda plan: plan.grouped_sign_parts  # noqa: E731
    with monkeypatch.context() as patch:
        fast_calls = _recorded(patch, "_direct_fast", signed)
        fast = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    assert any(taken for _, taken in fast_calls)
    assert all(taken for _, taken in fast_calls)  # every call of a direct-only plan
    profiled = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt, profile=True), ids, assignment)
    _refused(monkeypatch, "_direct_fast")
    with monkeypatch.context() as patch:
        hook_calls = _recorded(patch, "_shares_into_output", signed)
        combined = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    assert any(taken for _, taken in hook_calls)
    assert all(taken == has_signs for has_signs, taken in hook_calls)  # every linear layer with sign parts
    _refused(monkeypatch, "_shares_into_output")
    separate = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    for got, hooked, want, timed in zip(fast, combined, separate, profiled, strict=True):
        assert torch.equal(got, want) and torch.equal(hooked, want) and torch.equal(timed, want)
    base = _merged_last_logits(rt, ids, [None] * len(assignment))
    torch.testing.assert_close(combined[1][1], base[1])  # the base row (batched: BLAS blocking may differ)
    assert not torch.equal(combined[1][0], base[0])


def test_tiny_cache_budget_evicts_and_gives_the_same_logits():
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    assignment = _assignment(fleet)
    ids = torch.randint(0, 256, (len(assignment), 5), generator=torch.Generator().manual_seed(10))
    outs = []
    for budget in (0, 16 << 10, 256 << 20):
        executor = MultiDeltaExecutor(rt, sign_cache_bytes=budget)
        with torch.no_grad(), executor.assign(assignment):
            outs.append(rt.model(ids).logits)
            outs.append(rt.model(ids).logits)
        if budget == 16 << 10:
            assert executor.sign_cache.evictions > 0
            assert executor.sign_cache.nbytes <= executor.sign_cache.limit_bytes
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_without_the_sign_kernel_rows_still_equal_merged_weights(monkeypatch):
    """The torch form (CUDA, or no C compiler) of the sign products gives the same rows."""
    monkeypatch.setattr(signmm, "_tried", True)
    monkeypatch.setattr(signmm, "_library", None)
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    assignment = _assignment(fleet)
    ids = torch.randint(0, 256, (len(assignment), 6), generator=torch.Generator().manual_seed(11))
    prefill, step = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    merged = _merged_last_logits(rt, ids, assignment)
    for row in range(len(assignment)):
        torch.testing.assert_close(step[row], merged[row], rtol=1e-4, atol=1e-4)


def test_delta_shares_do_not_depend_on_the_thread_count():
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    assignment = _assignment(fleet)
    ids = torch.randint(0, 256, (len(assignment), 6), generator=torch.Generator().manual_seed(12))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                base = rt.model(ids).logits
                with MultiDeltaExecutor(rt).assign(assignment):
                    mixed = rt.model(ids).logits
            outs.append((base, mixed))
    finally:
        torch.set_num_threads(before)
    if not torch.equal(outs[0][0], outs[1][0]):
        pytest.skip("the base forward itself depends on the thread count on this machine")
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_batch_on_cuda_equals_merged_weights():
    fleet = cached_fleet("llama")
    rt = _runtime(fleet, device="cuda")
    assignment = _assignment(fleet)
    ids = torch.randint(0, 256, (len(assignment), 6), generator=torch.Generator().manual_seed(13)).cuda()
    prefill, step = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    merged = _merged_last_logits(rt, ids, assignment)
    for row in range(len(assignment)):
        torch.testing.assert_close(step[row], merged[row], rtol=1e-4, atol=1e-4)


def test_forwards_are_restored_after_the_block_and_norms_skip_their_own_once_checked():
    """Inside assign the touched modules run a replaced forward; on exit every module's own forward is
    back, and one that another library set on the instance is kept. A checked per-row RMSNorm does not
    run its own forward again: three cached steps still equal the merged weights."""
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    assignment = _assignment(fleet)
    model = rt.model
    norm = model.model.norm
    calls = []
    own = norm.forward

    def wrapped(*args, **kwargs):  # what an accelerate-style hook leaves on the instance
        calls.append(1)
        return own(*args, **kwargs)

    norm.forward = wrapped
    ids = torch.randint(0, 256, (len(assignment), 5), generator=torch.Generator().manual_seed(13))
    executor = MultiDeltaExecutor(rt)
    with torch.no_grad(), executor.assign(assignment):
        replaced = [m for m in model.modules() if "forward" in m.__dict__]
        assert len(replaced) > 1 and norm.forward is not wrapped
        out = model(ids[:, :2], use_cache=True)
        checked = len(calls)
        for t in range(2, 5):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
    assert norm.forward is wrapped
    assert [m for m in model.modules() if "forward" in m.__dict__] == [norm]
    plan_norm_skipped = len(calls) == checked  # the model's last norm is touched by the deltas
    assert checked >= 1 and plan_norm_skipped
    merged = _merged_last_logits(rt, ids, assignment)
    for row in range(len(assignment)):
        torch.testing.assert_close(out.logits[row, -1], merged[row], rtol=1e-4, atol=1e-4)


def test_a_norms_per_row_check_is_kept_for_later_batches_with_other_deltas(monkeypatch):
    """The per-row RMSNorm form is checked against each delta's re-run on a module's first batch; the
    executor keeps that verdict for the module, so a later batch with other deltas and rows re-runs no
    delta's norm to compare, and its logits equal those of a fresh executor that checks again."""
    fleet = cached_fleet("llama")
    rt = _runtime(fleet)
    names = [n for n in fleet["delta"] if n != "lossless"]
    first, later = [names[0], None, names[1]], [names[2], names[0], names[2], None]
    reruns = []
    per_part = MultiDeltaExecutor._per_part_rerun

    def counted(self, plan, x, args, kwargs, result):
        reruns.append(plan.module)
        return per_part(self, plan, x, args, kwargs, result)

    monkeypatch.setattr(MultiDeltaExecutor, "_per_part_rerun", counted)
    executor = MultiDeltaExecutor(rt)
    ids = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(16))
    with torch.no_grad(), executor.assign(first):
        rt.model(ids[:3])
    norms = {m for m in reruns if "norm" in type(m).__name__.lower()}
    assert norms  # the first batch checked its norms
    reruns.clear()
    with torch.no_grad(), executor.assign(later):
        kept = rt.model(ids).logits
    assert not norms & set(reruns)
    with torch.no_grad(), MultiDeltaExecutor(rt).assign(later):
        fresh = rt.model(ids).logits
    assert torch.equal(kept, fresh)


def test_4_bit_factors_read_as_codes_give_the_logits_of_their_fp32_copy_beside_16_bit_ones(
    monkeypatch, tmp_path
):
    """svd and dqrelo deltas with the default 4-bit factors, in one batch with an svd delta of fp16
    factors: the compiled group reads the 4-bit ones as codes, and the logits are those of the fp32
    dequantized copies bit for bit, and those of each row's merged weights."""
    import deltakit
    from deltakit.ops import lowrank_group
    from deltakit.ops.lowrank_group import GroupFactors

    if not lowrank_group.available():
        pytest.skip("needs the compiled kernel")
    fleet = cached_fleet("llama")
    svd4, dqrelo = (next(n for n in fleet["delta"] if n.startswith(m)) for m in ("svd", "dqrelo"))
    deltakit.compress(
        fleet["base"], fleet["ft"][svd4], tmp_path / "svd16", method="svd", rank=4, config={"factor_bits": 16}
    )
    rt = _runtime(fleet)
    rt.add_delta("svd16", tmp_path / "svd16")
    assignment = [svd4, "svd16", dqrelo, None, "svd16", svd4]
    ids = torch.randint(0, 256, (len(assignment), 6), generator=torch.Generator().manual_seed(21))
    prepared = []
    original = GroupFactors.prepare_quantized.__func__

    def spy(cls, first, second):
        prepared.append(first.bits)
        return original(cls, first, second)

    with monkeypatch.context() as patch:
        patch.setattr(GroupFactors, "prepare_quantized", classmethod(spy))
        codes = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    assert prepared and set(prepared) == {4}
    monkeypatch.setattr(lowrank_group, "quantized_applies", lambda q: False)
    widened = _mixed_prefill_then_step(rt, MultiDeltaExecutor(rt), ids, assignment)
    for got, want in zip(codes, widened, strict=True):
        assert torch.equal(got, want)
    merged = _merged_last_logits(rt, ids, assignment)
    for row in range(len(assignment)):
        torch.testing.assert_close(codes[1][row], merged[row], rtol=1e-4, atol=1e-4)
