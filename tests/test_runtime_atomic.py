"""Swap atomicity: a swap that fails at any tensor leaves the model exactly as before, and ``active`` says so.

Faults are injected into :meth:`HotSwapRuntime._write_param` (the in-place write of one parameter) at
every position of a swap; afterwards every parameter is compared bit for bit with the pristine base (or
with ``deltakit.apply``'s model of the delta that was active before).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_runtime_support import applied_model, cached_fleet, finetune, make_fleet
from transformers import AutoModelForCausalLM

import deltakit
from deltakit.errors import DeltakitError, NonFiniteError, TensorMismatchError
from deltakit.runtime import HotSwapRuntime


class Injected(RuntimeError):
    """The fault the tests inject."""


@pytest.fixture(scope="module")
def fleet() -> dict:
    return cached_fleet("llama")


@pytest.fixture(scope="module")
def base_state(fleet) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(fleet["base"], dtype="auto")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _runtime(fleet: dict) -> HotSwapRuntime:
    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    for name, path in fleet["delta"].items():
        rt.add_delta(name, path)
    return rt


def _assert_params_equal(model, state: dict[str, torch.Tensor]) -> None:
    ours = dict(model.named_parameters())
    assert set(ours) == set(state)
    for name, tensor in state.items():
        assert torch.equal(ours[name], tensor), f"{name} differs"


def _count_writes(rt: HotSwapRuntime, name: str | None) -> int:
    """Parameter writes of one swap: each single write, and the single-pass batch as one."""
    calls = []
    original, batch = rt._write_param, rt._write_fused
    rt._write_param = lambda canonical, value: (calls.append(canonical), original(canonical, value))
    rt._write_fused = lambda plan, **kw: (calls.append("batch"), batch(plan, **kw))
    try:
        rt.activate(name)
    finally:
        _uninject(rt)
    return len(calls)


def _inject_at(rt: HotSwapRuntime, k: int) -> None:
    """Make the k-th parameter write from now on raise (once; the single-pass batch counts as one write);
    later writes succeed."""
    original, batch = rt._write_param, rt._write_fused
    seen = [0]

    def fault(what: str) -> None:
        seen[0] += 1
        if seen[0] == k + 1:
            raise Injected(f"injected fault writing {what}\nsecond line")

    def write(canonical: str, value: torch.Tensor) -> None:
        fault(canonical)
        original(canonical, value)

    def write_batch(plan, **kw) -> None:
        fault("the single-pass matrices")
        batch(plan, **kw)

    rt._write_param, rt._write_fused = write, write_batch


def _uninject(rt: HotSwapRuntime) -> None:
    del rt._write_param, rt._write_fused


@pytest.mark.parametrize("delta", ["dqrelo-0", "lossless-3"])
def test_failed_swap_from_base_at_every_tensor_serves_base_bit_exact(fleet, base_state, delta):
    rt = _runtime(fleet)
    writes = _count_writes(rt, delta)
    rt.activate(None)
    ops = rt.host_delta(delta)[0].ops.values()
    single_pass = sum(op.view is not None and len(op.view.shape) == 2 for op in ops)
    # every matrix, norm and the tied embedding of the tiny Llama: the single-pass matrices as one write
    assert writes == len(ops) - single_pass + (single_pass > 0) and writes >= 5
    for k in range(writes):
        _inject_at(rt, k)
        with pytest.raises(DeltakitError) as info:
            rt.activate(delta)
        _uninject(rt)
        message = str(info.value)
        assert "\n" not in message and "injected fault" in message and "serving the base" in message
        assert rt.active is None
        _assert_params_equal(rt.model, base_state)
    assert rt.activate(delta).target == delta  # the delta itself still works after all these failures
    assert rt.active == delta


def test_failed_swap_between_deltas_restores_the_previous_delta(fleet):
    rt = _runtime(fleet)
    previous, target = "bitdelta-1", "svd-2"
    reference = applied_model(fleet["base"], fleet["delta"][previous], fleet["root"] / f"applied-{previous}")
    state = {n: p.detach().clone() for n, p in reference.named_parameters()}
    rt.activate(previous)
    writes = _count_writes(rt, target)
    rt.activate(previous)
    for k in range(writes):
        _inject_at(rt, k)
        with pytest.raises(DeltakitError, match=f"serving delta '{previous}'"):
            rt.activate(target)
        _uninject(rt)
        assert rt.active == previous
        _assert_params_equal(rt.model, state)


def test_non_finite_decode_at_swap_time_is_refused_and_rolled_back(fleet, base_state, monkeypatch):
    """A tensor that decodes to NaN on a copy's first swap (e.g. a delta read again from disk after it
    changed there): refused, every parameter restored."""
    rt = _runtime(fleet)
    original = HotSwapRuntime._rebuild
    host = rt.host_delta("dqrelo-0")[0]
    host.checked = False  # a copy never written before: every rebuilt tensor is checked
    victim = next(name for name, op in host.ops.items() if op.view is None)  # not a single-pass write

    def poisoned(prepared, op, base, out=None, **options):
        value = original(prepared, op, base, out=out, **options)
        if op.name == victim:
            value = value.clone()
            value.view(-1)[5] = float("nan")
        return value

    monkeypatch.setattr(HotSwapRuntime, "_rebuild", staticmethod(poisoned))
    with pytest.raises(NonFiniteError, match="NaN or Inf") as info:
        rt.activate("dqrelo-0")
    assert info.value.exit_code == 7 and rt.active is None
    _assert_params_equal(rt.model, base_state)


def test_a_new_copy_of_a_delta_is_checked_for_non_finite_values_on_its_first_swap(fleet, base_state):
    """The fused write skips the finiteness check only for a copy already written once without fault."""
    from dataclasses import replace

    from deltakit.runtime.prepared import PreparedDelta

    rt = _runtime(fleet)
    name = "dqrelo-0"
    host = rt.host_delta(name)[0]
    assert host.checked  # validated when it was added
    from deltakit.codecs.base import FactoredView

    canonical, op = next((c, o) for c, o in host.ops.items() if o.view is not None and o.view.has_low_rank)
    v = op.view
    up = v.up.clone()  # the 4-bit factors dequantized: the copy holds float factors
    up[0, 0] = float("inf")
    ops = dict(host.ops)
    ops[canonical] = replace(op, view=FactoredView(v.shape, v.signs, v.scale, up, v.down))
    rt.host_cache.put(name, PreparedDelta(host.name, host.codec, host.base_fingerprint, ops))  # unchecked
    with pytest.raises(NonFiniteError, match="NaN or Inf"):
        rt.activate(name)
    assert rt.active is None
    _assert_params_equal(rt.model, base_state)
    rt.host_cache.put(name, host)
    rt.activate(name)
    assert rt.active == name


def test_tensors_outside_the_fused_path_are_checked_for_finite_values_on_a_copys_first_swap_only(
    fleet, monkeypatch
):
    """Like the fused write: a copy written once without fault is not scanned again (its rebuild is
    deterministic); its shapes are checked on every write."""
    import deltakit.runtime.hotswap as hotswap

    rt = _runtime(fleet)
    host = rt.host_delta("dqrelo-0")[0]
    host.checked = False  # as a copy read again from disk
    flags = []
    original = hotswap.check_rebuilt

    def recording(d, c, v, p, *, finite=True):
        flags.append(finite)
        original(d, c, v, p, finite=finite)

    monkeypatch.setattr(hotswap, "check_rebuilt", recording)
    rt.activate("dqrelo-0")
    first, flags[:] = list(flags), []
    assert first and all(first) and host.checked
    rt.activate(None)
    rt.activate("dqrelo-0")
    assert len(flags) == len(first) and not any(flags)


def test_shape_that_only_broadcasts_is_refused_at_swap(fleet, base_state, monkeypatch):
    rt = _runtime(fleet)
    original = HotSwapRuntime._rebuild

    def broadcasting(prepared, op, base, out=None, **options):
        value = original(prepared, op, base, out=out, **options)
        return value[:1] if value.numel() > 1 else value  # (1, ...): copy_ would broadcast it

    monkeypatch.setattr(HotSwapRuntime, "_rebuild", staticmethod(broadcasting))
    with pytest.raises(TensorMismatchError, match="shape"):
        rt.activate("svd-2")
    assert rt.active is None
    _assert_params_equal(rt.model, base_state)


def _nan_delta(fleet: dict, tmp_path):
    """A copy of the dqrelo delta with one NaN in a stored factor (hashes not updated)."""
    out = tmp_path / "nan-delta"
    shutil.copytree(fleet["delta"]["dqrelo-0"], out)
    shard = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 4)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[2] = float("nan")
    save_file(tensors, shard)
    return out


def test_nan_in_stored_factors_is_refused_when_registered(fleet, base_state, tmp_path):
    rt = HotSwapRuntime.from_pretrained(fleet["base"])
    with pytest.raises(NonFiniteError) as info:
        rt.add_delta("nan", _nan_delta(fleet, tmp_path), verify=False)
    assert info.value.exit_code == 7 and "\n" not in str(info.value)
    assert rt.names() == [] and rt.active is None
    _assert_params_equal(rt.model, base_state)


@pytest.fixture(scope="module")
def bf16_lossless(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bf16-lossless")
    fleet = make_fleet(root, dtype=torch.bfloat16, methods=("dqrelo",))
    ft = finetune(fleet["base"], root / "ft-lossless", seed=7)
    deltakit.compress(fleet["base"], ft, root / "delta-lossless", method="lossless")
    fleet["delta"]["lossless"] = root / "delta-lossless"
    return fleet


def test_exact_codec_on_a_wider_served_dtype_is_refused_at_load(bf16_lossless):
    """A bf16 base served as float32 cannot take a lossless delta (it restores exact bf16 bits)."""
    rt = HotSwapRuntime.from_pretrained(bf16_lossless["base"], dtype="float32")
    with pytest.raises(TensorMismatchError, match="dtype='auto'"):
        rt.add_delta("exact", bf16_lossless["delta"]["lossless"])
    assert rt.names() == []
    rt.add_delta("approx", bf16_lossless["delta"]["dqrelo-0"])  # a non-exact codec is served (cast)
    assert rt.activate("approx").target == "approx"
    served = HotSwapRuntime.from_pretrained(bf16_lossless["base"])  # dtype auto: bf16, accepted
    served.add_delta("exact", bf16_lossless["delta"]["lossless"])
    served.activate("exact")
    ft = AutoModelForCausalLM.from_pretrained(bf16_lossless["base"].parent / "ft-lossless", dtype="auto")
    _assert_params_equal(served.model, {n: p.detach() for n, p in ft.named_parameters()})


def test_bf16_base_served_as_float32_keeps_bf16_pristine_copies_and_stays_exact():
    """Pristine copies keep the checkpoint's dtype (half the memory); swaps give apply's bf16 model upcast."""
    from deltakit.runtime import MultiDeltaExecutor

    fleet = cached_fleet("llama-bf16")
    rt = HotSwapRuntime.from_pretrained(fleet["base"], dtype="float32")
    for name, path in fleet["delta"].items():
        rt.add_delta(name, path)
    assert {p.dtype for p in rt.model.parameters()} == {torch.float32}
    assert rt.resident.pristine_bytes > 0
    assert {rt.resident.pristine(c).dtype for c in rt.resident._pristine} == {torch.bfloat16}
    base = AutoModelForCausalLM.from_pretrained(fleet["base"], dtype="float32")
    for name in [*fleet["delta"], None]:
        rt.activate(name)
        if name is None:
            expected = {n: p.detach() for n, p in base.named_parameters()}
        else:
            ref = applied_model(fleet["base"], fleet["delta"][name], fleet["root"] / f"applied-{name}")
            expected = {n: p.detach().float() for n, p in ref.named_parameters()}
        _assert_params_equal(rt.model, expected)
    # mixed batches work on the float32 model too. The batched path adds the fp32 delta to the base
    # unrounded, while a merged swap rounds each rebuilt weight to the fine-tune's dtype (bf16, as apply
    # does): so a mixed row equals, within fp32 rounding, the model with unrounded fp32 weights
    names = list(fleet["delta"])
    assignment = [names[0], None, names[1]]
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(5))
    gaps = []
    with torch.no_grad():
        rt.activate(None)
        base_batch = rt.model(ids).logits
        with MultiDeltaExecutor(rt).assign(assignment):
            mixed = rt.model(ids).logits
        for row, name in enumerate(assignment):
            unrounded = _fp32_merged(rt, name)
            torch.testing.assert_close(
                mixed[row], unrounded(ids[row : row + 1]).logits[0], rtol=1e-4, atol=1e-4
            )
            rt.activate(name)
            gaps.append(float((mixed[row] - rt.model(ids[row : row + 1]).logits[0]).abs().max()))
    # a base row is the base model's own row of the same batch, bit for bit (compared within one batch:
    # a BLAS matmul's row bits may depend on the batch's row count); delta rows differ by the rounding
    assert torch.equal(mixed[1], base_batch[1])
    assert min(gaps[0], gaps[2]) > 0


def _fp32_merged(rt: HotSwapRuntime, name: str | None):
    """A copy of the served (float32) base with ``base + decode(delta)`` written unrounded in fp32."""
    import copy

    rt.activate(None)
    model = copy.deepcopy(rt.model)
    if name is None:
        return model
    params = model.state_dict(keep_vars=True)
    prepared = rt.host_delta(name)[0]
    for canonical, op in prepared.ops.items():
        pristine = rt.resident.pristine(canonical)
        if op.kind == "passthrough":
            value = op.tensors["value"].float()
        else:
            value = prepared.codec.reconstruct(op.encoded(), pristine, torch.float32)
        params[canonical].data.copy_(value)
    return model


def test_fused_writes_land_in_the_parameter_without_a_second_pass(fleet, monkeypatch):
    """A factored tensor is rebuilt straight into ``param.data``: no separate check and copy of it."""
    import deltakit.runtime.hotswap as hotswap

    rt = _runtime(fleet)
    prepared = rt.host_delta("dqrelo-0")[0]
    factored = {c for c, op in prepared.ops.items() if op.view is not None and len(op.view.shape) == 2}
    assert factored
    checked = []
    original = hotswap.check_rebuilt
    monkeypatch.setattr(
        hotswap, "check_rebuilt", lambda d, c, v, p, **kw: (checked.append(c), original(d, c, v, p, **kw))
    )
    rt.activate("dqrelo-0")
    assert checked and not factored & set(checked)  # only the non-factored tensors took the slow path
