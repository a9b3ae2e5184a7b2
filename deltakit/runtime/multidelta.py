"""Batches whose rows use different deltas, without merging: base forward once, plus per-row deltas.

Inside ``with executor.assign(["chat", None, "code", "chat"]):`` every forward pass of the resident model
(which holds the *base* weights) gets, through the ``forward`` (replaced for the block) of the modules
whose parameters the deltas touch, each row's delta added to that module's output (the plan of each
module is made once per ``assign``, see :mod:`.batchplan`):

- Linear / GPT-2 Conv1D weights of ``dqrelo``, ``bitdelta`` and ``svd`` deltas: the low-rank parts of all
  deltas in one compiled call reading the factors at their stored width (CPU; where they are the layer's
  only shares, reading the activations and adding into the output at the model's dtype), or as two thin matmuls
  over all rows (masked per row) or per delta, the sign part per delta from the packed bits (all
  deltas of a module in one compiled call on the CPU), and a changed bias as ``b_ft − b_base``;
- embedding tables of those codecs: the rows of Δ for the looked-up ids;
- anything else (norm weights stored exactly, other codecs): the module is re-run on the group's rows
  with the dense rebuilt parameters (correct for any module that treats batch rows independently).

On the CPU the thin matmuls of the low-rank parts, the unpacked-sign fallback and the dense re-runs of a
row group run on one thread: a BLAS matmul's bits can depend on how its rows are split between threads,
and the delta shares must not depend on the thread count (the packed sign kernel is thread-independent
by construction). With few rows one thread is also the faster choice.

Row i of every module input must be row i of the batch (true for decoder-only models with a KV cache).
The touched modules' ``forward`` is replaced only inside ``assign`` (the module's own, or one another
library set on the instance, is restored on exit); outside it the model is untouched.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deltakit.errors import UsageError
from deltakit.ops import lowrank_group
from deltakit.ops.lowrank_group import GroupFactors, LowRankGroup
from deltakit.ops.mixed_shares import SharesCall
from deltakit.ops.signmm import SignGroup, native_applies, native_library, sign_matmul, sign_tiles
from deltakit.ops.threads import one_thread_on_cpu
from deltakit.runtime.batchplan import (
    ModulePlan,
    Part,
    factor_pair,
    module_layout,
    part_path,
    rms_norm_rows,
    stack_mask,
)
from deltakit.runtime.hotswap import HotSwapRuntime
from deltakit.runtime.kernels import embedding_delta, sign_matrix
from deltakit.runtime.lru import ByteLRU
from deltakit.runtime.prepared import PreparedDelta, TensorOp

_guard = threading.local()
COST_KEYS = ("sign_s", "low_rank_s", "dense_s", "hooks_s")
#: without the compiled group: at most this many token rows (batch x positions) take the stacked low-rank
#: product, more go per delta
STACK_TOKENS = 64
__all__ = ["COST_KEYS", "MultiDeltaExecutor", "module_layout", "row_selector"]


def row_selector(rows: list[int]) -> slice | torch.Tensor:
    """A slice when ``rows`` are consecutive (a view, no gather), else an index tensor (CPU)."""
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.int64)


def _cached_bytes(item: tuple) -> int:
    return sum(t.nbytes if isinstance(t, GroupFactors) else t.numel() * t.element_size() for t in item[1])


class MultiDeltaExecutor:
    """Runs mixed-delta batches on a :class:`HotSwapRuntime`'s resident model.

    sign_cache_bytes: budget of the LRU of ready-to-use tensors (on the device, in the activations'
    dtype: low-rank factors, bias differences, rebuilt dense parameters, sign bits in the few-rows kernel's
    tile layout, and ±1 sign matrices where the
    packed-bit kernel does not apply) reused across the forward passes and batches; 0 rebuilds them on
    every call (same results).
    profile: accumulate the seconds spent in each part of the delta shares in :attr:`costs`
    (``sign_s``, ``low_rank_s``, ``dense_s``, ``hooks_s``; the device is synchronised around each part,
    which slows the forward a little). The base matmuls are the forward's time minus ``hooks_s``.
    """

    def __init__(self, runtime: HotSwapRuntime, *, sign_cache_bytes: int = 256 << 20, profile: bool = False):
        self.runtime = runtime
        self.profile = profile
        self.costs: dict[str, float] = dict.fromkeys(COST_KEYS, 0.0)
        #: key -> (op the tensors were made from, tensors)
        self.sign_cache: ByteLRU[tuple[TensorOp, tuple[torch.Tensor, ...]]] = ByteLRU(
            sign_cache_bytes, _cached_bytes
        )
        #: per module and (input, output) dtypes, whether its per-row weight form gave the bits of its
        #: per-delta re-runs when first checked: a property of the module's forward, not of the deltas,
        #: so later batches take the form (or not) without re-running every delta's rows to compare
        self._row_weight_verdicts: weakref.WeakKeyDictionary[nn.Module, dict[tuple, bool]] = (
            weakref.WeakKeyDictionary()
        )
        # parameter identity -> [(module, attribute)] for every module holding it (tied weights: several)
        self._users: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in runtime.model.modules():
            for attr, param in module.named_parameters(recurse=False):
                self._users.setdefault(id(param), []).append((module, attr))

    @contextmanager
    def assign(self, assignment: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i runs with delta ``assignment[i]`` (None: the base).

        Activates the base first (a swap), holds the runtime lock for the whole block, and restores the
        modules' forwards on exit.
        """
        runtime = self.runtime
        with runtime.lock:
            runtime.activate(None)
            deltas: dict[str, PreparedDelta] = {}
            for name in dict.fromkeys(a for a in assignment if a is not None):
                deltas[name] = runtime.device_delta(name)[0]
            plans = self._plans(deltas, assignment)
            replaced: list[tuple[nn.Module, object]] = []
            try:
                for plan in plans:
                    module = plan.module
                    replaced.append((module, module.__dict__.get("forward")))
                    module.forward = self._make_forward(plan, module.forward)
                yield
            finally:
                for module, own in reversed(replaced):
                    if own is None:
                        del module.forward
                    else:
                        module.forward = own

    def _plans(self, deltas: dict[str, PreparedDelta], assignment: Sequence[str | None]) -> list[ModulePlan]:
        """One plan per touched module: the row grouping and paths, made once for the whole batch."""
        runtime = self.runtime
        row_lists = {name: [i for i, a in enumerate(assignment) if a == name] for name in deltas}
        per_module: dict[nn.Module, dict[str, dict[str, TensorOp]]] = {}
        for name, prepared in deltas.items():
            for canonical, op in prepared.ops.items():
                users = self._users.get(id(runtime.resident.param(canonical)))
                if not users:
                    raise UsageError(
                        f"parameter {canonical} is used by no module: cannot batch delta {name!r}"
                    )
                for module, attr in users:
                    per_module.setdefault(module, {}).setdefault(name, {})[attr] = op
        factored = {name: prepared.factored for name, prepared in deltas.items()}  # one pass over each delta
        group_signs = runtime.device.type == "cpu" and native_library() is not None
        plans = []
        for module, by_delta in per_module.items():
            parts = [
                Part(
                    deltas[name],
                    _on(row_selector(row_lists[name]), runtime.device),
                    row_lists[name],
                    ops,
                    part_path(module, factored[name], ops),
                )
                for name, ops in by_delta.items()
            ]
            plan = ModulePlan(module, module_layout(module), len(assignment), parts, group_signs=group_signs)
            plans.append(plan)
        return plans

    def _make_forward(self, plan: ModulePlan, inner):
        """The module's forward inside ``assign``: ``inner`` (its own forward) and the delta shares added.

        An RMSNorm already checked to take the per-row weight form (:meth:`_dense_rows`) skips ``inner``:
        its base output would be recomputed for every row anyway. Dense re-runs (``_guard``) call
        ``inner`` alone.
        """

        direct_only = self._direct_only(plan)

        def forward(*args, **kwargs):
            if getattr(_guard, "active", False):
                return inner(*args, **kwargs)
            if direct_only:
                output = inner(*args, **kwargs)
                if self._direct_fast(plan, args[0] if args else next(iter(kwargs.values())), output):
                    return output
                return self._hook_body(plan, args, kwargs, output)
            if plan.row_weight is True:
                x = args[0] if args else next(iter(kwargs.values()))
                start = self._tick(x)
                if x.shape[0] == plan.batch:
                    batched = self._row_weight_rerun(plan, x, args, kwargs)
                    if batched is not None:
                        result = batched.to(plan.out_dtype)
                        self._tock("dense_s", start, result)
                        self._tock("hooks_s", start, result)
                        return result
            output = inner(*args, **kwargs)
            start = self._tick(output)
            result = self._hook_body(plan, args, kwargs, output)
            self._tock("hooks_s", start, result)
            return result

        return forward

    def _direct_only(self, plan: ModulePlan) -> bool:
        """Whether the plan's only delta shares are low-rank and grouped sign parts that compiled calls add
        straight into the output (svd, dqrelo and bitdelta deltas on the CPU, library built, not
        profiling): :meth:`_direct_fast` then."""
        return (
            bool(plan.low_rank_parts or plan.grouped_sign_parts)
            and not (plan.share_parts or plan.dense_parts or self.profile)
            and self.runtime.device.type == "cpu"
            and lowrank_group.available()
        )

    def _direct_fast(self, plan: ModulePlan, x: torch.Tensor, output: torch.Tensor) -> bool:
        """:meth:`_hook_body`'s direct paths with only the checks they need per call: x (batch, ..., in)
        and the fresh output (batch, ..., out, mutated) contiguous, of one dtype the kernels read, no
        gradient recorded. False (nothing done) otherwise: :meth:`_hook_body` then takes the call.

        Decoding makes about 210 such calls per token on SmolLM2, and Python runs slowly between them
        (the base matmul and the factor stream leave little of it in cache): the general hook's Python
        took about 24 µs a call in the model. The calls here go straight to the groups' trusted entry
        points (:meth:`~deltakit.ops.lowrank_group.LowRankGroup.add_into_trusted`,
        :meth:`~deltakit.ops.mixed_shares.SharesCall.add_into_trusted`): the plan fixes their shapes and
        rows, and only the feature sizes and row count are checked again."""
        if (
            x.shape[0] != plan.batch
            or x.dtype is not output.dtype
            or x.dtype not in lowrank_group.KINDS
            or not (x.is_contiguous() and output.is_contiguous())
            or torch.is_grad_enabled()
            or not x.shape[-1]
        ):
            return False
        self._direct_call(plan, x.numel() // (x.shape[-1] * plan.batch)).add_into_trusted(x, output)
        return True

    def _add_direct(self, plan: ModulePlan, flat: torch.Tensor, out: torch.Tensor) -> None:
        """Every low-rank and grouped sign share of the plan added into ``out`` (tokens, out; mutated) for
        the activations ``flat`` (tokens, in), both contiguous at one dtype, every argument checked."""
        self._direct_call(plan, flat.shape[0] // plan.batch).add_into(flat, out)

    def _direct_call(self, plan: ModulePlan, per_row: int) -> LowRankGroup | SharesCall:
        """The one compiled call of the plan's direct shares for inputs of ``per_row`` tokens per row: the
        low-rank group alone when there are no sign parts, else a
        :class:`~deltakit.ops.mixed_shares.SharesCall` kept on the plan."""
        if not plan.grouped_sign_parts:
            return self._low_rank_group(plan, per_row)
        call = plan.share_calls.get(per_row)
        if call is None:
            low_rank = self._low_rank_group(plan, per_row) if plan.low_rank_parts else None
            call = plan.share_calls[per_row] = SharesCall(low_rank, self._sign_group(plan, per_row))
        return call

    def _tick(self, tensor: torch.Tensor) -> float:
        """A start time for :meth:`_tock` (device synchronised when profiling)."""
        if not self.profile:
            return 0.0
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        return time.perf_counter()

    def _tock(self, key: str, start: float, tensor: torch.Tensor) -> None:
        if self.profile:
            self.costs[key] += self._tick(tensor) - start

    def reset_costs(self) -> None:
        self.costs = dict.fromkeys(COST_KEYS, 0.0)

    def _hook_body(self, plan: ModulePlan, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
        """The work after the module's own forward: the base output with every row group's delta share
        added (in place when it is a fresh tensor and no gradient is recorded, else into a copy)."""
        x = args[0] if args else next(iter(kwargs.values()))
        batch = plan.batch
        if x.shape[0] == 1 and batch > 1:  # broadcast input (GPT-2's position ids): same for every row
            x = x.expand(batch, *x.shape[1:])
            result = output.expand(batch, *output.shape[1:]).clone()
        elif x.shape[0] != batch:
            raise UsageError(f"module input has {x.shape[0]} rows, the delta assignment has {batch}")
        elif torch.is_grad_enabled() or not output.is_contiguous():
            result = output.clone(memory_format=torch.contiguous_format)
        else:
            result = output
        share = None  # fp32 (batch, ..., out): every factored part's share, added to result at once
        # svd rows: their only share, added already; sign + low-rank rows: all their shares in one call
        direct = self._low_rank_into_output(plan, x, result) or self._shares_into_output(plan, x, result)
        needs_fp32 = (plan.low_rank_parts or plan.grouped_sign_parts) and x.dtype != torch.float32
        xf = x.to(torch.float32) if needs_fp32 and not direct else x
        if plan.low_rank_parts and not direct:
            start = self._tick(x)
            share = self._low_rank(plan, xf)
            self._tock("low_rank_s", start, share)
        if plan.grouped_sign_parts and not direct:
            start = self._tick(x)
            if share is None:
                share = torch.zeros(result.shape, dtype=torch.float32, device=result.device)
            flat = xf.reshape(-1, xf.shape[-1]).contiguous()  # (tokens, in)
            self._sign_group(plan, flat.shape[0] // batch).add_into(flat, share.view(-1, share.shape[-1]))
            self._tock("sign_s", start, share)
        for part in plan.share_parts:
            part_share = self._factored_share(plan, part, x)
            if part_share is None:
                continue
            if share is None:
                share = torch.zeros(result.shape, dtype=torch.float32, device=result.device)
            _add_rows(share, part, part_share)
        if share is not None:
            result.add_(share)
        if plan.dense_parts:
            start = self._tick(x)
            result = self._dense_rows(plan, x, args, kwargs, result)
            self._tock("dense_s", start, result)
        return result

    def _dense_rows(
        self, plan: ModulePlan, x: torch.Tensor, args: tuple, kwargs: dict, result: torch.Tensor
    ) -> torch.Tensor:
        """The rows of the dense parts re-run with their rebuilt parameters.

        An RMSNorm whose only parameter is the changed 1-D ``weight`` is computed once for all rows with a
        per-row weight (batch, 1, ..., dim) by :func:`~.batchplan.rms_norm_rows`. The first call of a
        module (per input and output dtype, for this executor) checks that against the module's own
        forward on each delta's rows and keeps the per-delta re-runs when any bit differs; later plans of
        the module take that verdict (:attr:`_row_weight_verdicts`) without re-running the deltas' rows.
        """
        if plan.row_weight is not False:
            batched = self._row_weight_rerun(plan, x, args, kwargs)
            if plan.row_weight is None and batched is not None:
                verdicts = self._row_weight_verdicts.setdefault(plan.module, {})
                key = (x.dtype, result.dtype)
                plan.out_dtype = result.dtype
                if key in verdicts:
                    plan.row_weight = verdicts[key]
                else:
                    per_part = self._per_part_rerun(plan, x, args, kwargs, result.clone())
                    plan.row_weight = verdicts[key] = torch.equal(batched.to(result.dtype), per_part)
                    return per_part
            if batched is not None and plan.row_weight:
                return batched.to(result.dtype)
        return self._per_part_rerun(plan, x, args, kwargs, result)

    def _per_part_rerun(
        self, plan: ModulePlan, x: torch.Tensor, args: tuple, kwargs: dict, result: torch.Tensor
    ) -> torch.Tensor:
        for part in plan.dense_parts:
            dense = self._dense_rerun(plan.module, self._dense_params(part), x[part.rows], args, kwargs)
            result[part.rows] = dense.to(result.dtype)
        return result

    def _row_weight_rerun(self, plan: ModulePlan, x: torch.Tensor, args: tuple, kwargs: dict):
        """An RMSNorm on all rows with a per-row weight; None when the plan or module does not fit.

        The module and plan are checked once (the per-row weights are built then); later calls only
        check that the call itself takes the plain ``norm(x)`` form."""
        if len(args) != 1 or kwargs:
            plan.row_weight = False
            return None
        if plan.row_weights is None and not self._prepare_row_weights(plan):
            plan.row_weight = False
            return None
        weights = plan.row_weights  # (batch, dim)
        shape = (plan.batch, *([1] * (x.dim() - 2)), weights.shape[-1])
        return rms_norm_rows(x, weights.view(shape), plan.row_eps)

    def _prepare_row_weights(self, plan: ModulePlan) -> bool:
        """Whether the plan's module is an RMSNorm whose only change is its 1-D weight; if so, sets
        ``plan.row_weights`` (batch, dim) and ``plan.row_eps``."""
        module = plan.module
        own = dict(module.named_parameters(recurse=False))
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if (
            not type(module).__name__.endswith("RMSNorm")
            or not isinstance(eps, float)
            or set(own) != {"weight"}
            or own["weight"].dim() != 1
            or any(set(p.ops) != {"weight"} for p in plan.dense_parts)
            or plan.factored_parts
        ):
            return False
        weights = own["weight"].detach().expand(plan.batch, -1).clone()  # (batch, dim)
        for part in plan.dense_parts:
            weights[part.rows] = self._dense_params(part)["weight"].to(weights.dtype)
        plan.row_weights, plan.row_eps = weights, eps
        return True

    @staticmethod
    def _into_output_applies(plan: ModulePlan, x: torch.Tensor, result: torch.Tensor) -> bool:
        """Whether a compiled call can add the plan's shares straight into ``result``: no shares besides
        the low-rank and grouped sign parts, CPU, x at ``result``'s dtype (one the kernels read), one
        input row per batch row, and the library built."""
        return (
            not plan.share_parts
            and x.device.type == "cpu"
            and x.dtype == result.dtype
            and x.dtype in lowrank_group.KINDS
            and x.shape[0] == plan.batch
            and lowrank_group.available()
        )

    def _low_rank_into_output(self, plan: ModulePlan, x: torch.Tensor, result: torch.Tensor) -> bool:
        """When low-rank parts are the module's only delta shares (svd deltas), add them straight into
        ``result`` (contiguous, mutated) at its own dtype with the compiled group, reading x at its own
        dtype: no fp32 copy of x, no fp32 share buffer, no separate add. The kernel rounds each element as
        ``result.add_(share)`` would (same bits); rows of no delta are not touched. False (nothing done)
        when the plan has other shares, or off the CPU, without the library, or for mixed dtypes."""
        if (
            not plan.low_rank_parts
            or plan.grouped_sign_parts
            or not self._into_output_applies(plan, x, result)
        ):
            return False
        start = self._tick(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (tokens, in)
        self._add_direct(plan, flat, result.view(flat.shape[0], -1))
        self._tock("low_rank_s", start, result)
        return True

    def _shares_into_output(self, plan: ModulePlan, x: torch.Tensor, result: torch.Tensor) -> bool:
        """When grouped sign parts (and low-rank parts, or none) are the module's only delta shares
        (dqrelo, bitdelta, with svd deltas or not), add them all into ``result`` (contiguous, mutated) in
        one compiled call (:func:`~deltakit.ops.mixed_shares.add_shares_into`): the same operations as the
        fp32 copy of x, the fp32 share, the two group calls and ``result.add_(share)``, so the same bits,
        without torch's per-call overhead. False (nothing done) when the plan has other shares, off the
        CPU, without the library, for mixed dtypes, or when profiling: the profiled run makes the sign and
        low-rank calls apart to time each."""
        if self.profile or not plan.grouped_sign_parts or not self._into_output_applies(plan, x, result):
            return False
        flat = x.reshape(-1, x.shape[-1]).contiguous()  # (tokens, in)
        self._add_direct(plan, flat, result.view(flat.shape[0], -1))
        return True

    def _low_rank(self, plan: ModulePlan, x: torch.Tensor) -> torch.Tensor:
        """fp32 ``(x A) B`` of each row's own delta for the fp32 input x, for all rows (0 for rows of no
        low-rank delta).

        On the CPU: one compiled call over every delta's factors at their stored width, each delta on
        its own rows (:class:`~deltakit.ops.lowrank_group.LowRankGroup`, bits independent of the thread
        count; on SmolLM2's shapes 1.0-1.3x faster than one-thread fp32 matmuls from 8 to 1024 rows).
        Elsewhere (CUDA, no C compiler): few token rows take one product with every delta's factors
        stacked in fp32, masked per row; many (prefill) go per delta on its rows, which does not
        multiply the flops by the delta count.
        """
        tokens = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and lowrank_group.available():
            group = self._low_rank_group(plan, tokens // plan.batch)
            share = torch.zeros(*x.shape[:-1], group.out_features, dtype=torch.float32)
            flat = x.reshape(-1, x.shape[-1]).contiguous()  # (tokens, in), x is fp32 here
            group.add_into(flat, share.view(tokens, -1))
            return share
        with one_thread_on_cpu(x.device):
            return self._low_rank_products(plan, x.to(torch.float32))

    def _low_rank_group(self, plan: ModulePlan, per_row: int) -> LowRankGroup:
        """The plan's low-rank parts as one kernel call for inputs of ``per_row`` tokens per row."""
        group = plan.low_rank_groups.get(per_row)
        if group is None:
            factors = [self._group_factors(p, plan.layout) for p in plan.low_rank_parts]
            group = LowRankGroup(factors, _token_rows(plan.low_rank_parts, per_row))
            plan.low_rank_groups[per_row] = group
        return group

    def _low_rank_products(self, plan: ModulePlan, xf: torch.Tensor) -> torch.Tensor:
        """:meth:`_low_rank` for the fp32 input ``xf`` (batch, ..., in)."""
        parts = plan.low_rank_parts
        if xf.numel() // xf.shape[-1] > STACK_TOKENS:
            share = None
            for part in parts:
                first, second = self._factors(part, plan.layout, xf.device)
                part_share = (xf[part.rows] @ first) @ second  # (n, ..., out)
                if share is None:
                    share = torch.zeros(
                        *xf.shape[:-1], second.shape[1], dtype=torch.float32, device=xf.device
                    )
                _add_rows(share, part, part_share)
            return share
        if plan.stacked is None:
            pairs = [self._factors(p, plan.layout, xf.device) for p in parts]
            ranks = [a.shape[1] for a, _ in pairs]
            first = torch.cat([a for a, _ in pairs], dim=1)  # (in, R)
            second = torch.cat([b for _, b in pairs], dim=0)  # (R, out)
            plan.stacked = (first, second, stack_mask(parts, ranks, plan.batch, xf.device))
        first, second, mask = plan.stacked
        h = xf @ first  # (batch, ..., R)
        h.mul_(mask.view(plan.batch, *([1] * (h.dim() - 2)), mask.shape[1]))
        return h @ second  # (batch, ..., out)

    def _factored_share(self, plan: ModulePlan, part: Part, x: torch.Tensor) -> torch.Tensor | None:
        """fp32 sign part, embedding rows and bias change of one delta for its rows, None when none."""
        weight, bias, rows = part.weight, part.bias, part.rows
        share: torch.Tensor | None = None
        if weight is not None and plan.layout == "embedding":
            share = embedding_delta(x[rows], weight)
        elif (
            weight is not None
            and weight.view is not None
            and weight.view.signs is not None
            and part not in plan.grouped_sign_parts
        ):
            start = self._tick(x)
            share = self._sign_share(part.prepared.name, weight, plan.layout, x[rows])
            self._tock("sign_s", start, share)
        if bias is not None:
            diff = self._bias_diff(part.prepared.name, bias, x.device)
            share = diff if share is None else share.add_(diff)
        return share

    def _sign_group(self, plan: ModulePlan, per_row: int) -> SignGroup:
        """The plan's grouped sign parts as one kernel call for inputs of ``per_row`` tokens per row."""
        group = plan.sign_groups.get(per_row)
        if group is None:
            parts = plan.grouped_sign_parts
            views = [p.weight.view for p in parts]
            rows = _token_rows(parts, per_row)
            tiles = [self._sign_tiles(p) for p in parts]
            scales = [float(v.scale) for v in views]
            group = SignGroup([v.signs for v in views], views[0].shape, rows, scales, tiles)
            plan.sign_groups[per_row] = group
        return group

    def _sign_tiles(self, part: Part) -> torch.Tensor:
        """The part's sign bits in the few-rows kernel's tile layout (:func:`sign_tiles`), cached so that
        a new ``assign`` does not lay them out again."""
        op = part.weight
        view = op.view

        def make() -> tuple[torch.Tensor]:
            return (sign_tiles(view.signs, view.shape),)

        return self._cached(f"{part.prepared.name}\0{op.name}\0sign tiles", op, make)[0]

    def _sign_share(self, delta: str, op: TensorOp, layout: str, x: torch.Tensor) -> torch.Tensor:
        """``α·(x Sᵀ)`` (``out_in``) or ``α·(x S)`` (``in_out``) in fp32 for x (n, ..., in)."""
        view = op.view
        assert view is not None and view.signs is not None
        if layout == "out_in" and native_applies(x, view.shape):
            part = sign_matmul(x, view.signs, view.shape)
        else:
            signs = self._signs(delta, op, x.dtype)
            with one_thread_on_cpu(x.device):
                part = x.to(signs.dtype) @ (signs.T if layout == "out_in" else signs)
        return part.to(torch.float32).mul_(float(view.scale))

    def _cached(self, key: str, op: TensorOp, make) -> tuple[torch.Tensor, ...]:
        """The LRU entry ``key`` made from ``op`` (``make()`` on a miss or when the delta was reloaded)."""
        cached = self.sign_cache.get(key)
        if cached is not None and cached[0] is op:
            return cached[1]
        tensors = make()
        self.sign_cache.put(key, (op, tensors))
        return tensors

    def _factors(self, part: Part, layout: str, device) -> tuple[torch.Tensor, ...]:
        """``(A (in, r), B (r, out))`` of the part's weight, fp32 contiguous (skinny fp32 products are
        several times faster than bf16 ones on CPUs, and exact for 16-bit factors)."""
        op = part.weight
        key = f"{part.prepared.name}\0{op.name}\0factors\0{layout}"
        return self._cached(key, op, lambda: factor_pair(op, layout, torch.float32, device))

    def _group_factors(self, part: Part, layout: str) -> GroupFactors:
        """The part's low-rank factors ``A (r, in)``, ``B (r, out)`` (``(x Aᵀ) B`` its share) prepared for
        the compiled group: group-quantized ones of up to 4 bits as their codes, float ones at their stored
        width when fp32, fp16 or bf16 (else fp32); cached. Either way the same bits."""
        op = part.weight
        view = op.view

        def make() -> tuple[GroupFactors]:
            if view.quantized is not None:
                q_up, q_down = view.quantized  # (rows, r), (r, cols) of the stored layout
                rows, cols = view.shape
                first, second = (q_down, q_up) if layout == "out_in" else (q_up, q_down)
                features = (cols, rows) if layout == "out_in" else (rows, cols)  # (in, out)
                if lowrank_group.quantized_pair_fits(first, second, view.rank, *features):
                    return (GroupFactors.prepare_quantized(first, second),)
            up, down = view.float_factors  # (None, None) for quantized ones: widened to fp32
            dtype = lowrank_group.stored_dtype(up, down) if up is not None else torch.float32
            first, second = factor_pair(op, layout, dtype, torch.device("cpu"))  # (in, r), (r, out)
            return (GroupFactors.prepare(first.T, second),)

        return self._cached(f"{part.prepared.name}\0{op.name}\0group factors\0{layout}", op, make)[0]

    def _bias_diff(self, delta: str, op: TensorOp, device) -> torch.Tensor:
        """``b_ft − b_base`` in fp32 (out,)."""

        def make() -> tuple[torch.Tensor, ...]:
            pristine = self.runtime.resident.pristine(op.name).to(device, torch.float32)
            return (op.tensors["value"].to(device, torch.float32) - pristine,)

        return self._cached(f"{delta}\0{op.name}\0bias", op, make)[0]

    def _signs(self, delta: str, op: TensorOp, activations: torch.dtype) -> torch.Tensor:
        """The ±1 matrix of ``op`` in the dtype the product is taken in (16-bit activations: theirs)."""
        dtype = activations if activations in (torch.bfloat16, torch.float16) else torch.float32
        key = f"{delta}\0{op.name}\0signs\0{dtype}"
        return self._cached(key, op, lambda: (sign_matrix(op, dtype),))[0]

    def _dense_params(self, part: Part) -> dict[str, torch.Tensor]:
        """The part's changed parameters rebuilt densely in the served dtype (cached)."""
        resident = self.runtime.resident
        params = {}
        for attr, op in part.ops.items():

            def make(op=op) -> tuple[torch.Tensor, ...]:
                pristine = resident.pristine(op.name).to(self.runtime.device)
                served = resident.param(op.name).dtype
                return (HotSwapRuntime._rebuild(part.prepared, op, pristine).to(served),)

            params[attr] = self._cached(f"{part.prepared.name}\0{op.name}\0dense", op, make)[0]
        return params

    @staticmethod
    def _dense_rerun(
        module: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """Fallback: ``module`` run on the rows ``x`` with ``params`` in place of its own (one thread on the
        CPU: the group's few rows would otherwise be split between threads depending on their count)."""
        _guard.active = True
        try:
            with one_thread_on_cpu(x.device):
                return torch.func.functional_call(module, params, (x, *args[1:]), kwargs)
        finally:
            _guard.active = False


def _token_rows(parts: list[Part], per_row: int) -> list[list[int]]:
    """Per part the indices of its rows' tokens in the flattened (batch * per_row, ...) activations."""
    return [[b * per_row + j for b in p.row_list for j in range(per_row)] for p in parts]


def _add_rows(share: torch.Tensor, part: Part, rows_share: torch.Tensor) -> None:
    """``share[part.rows] += rows_share`` (a view add for a slice, ``index_add_`` for an index tensor);
    rows_share (n, ..., out) or (out,) for every row."""
    if isinstance(part.rows, slice):
        share[part.rows].add_(rows_share)
    else:
        rows_share = rows_share.expand(len(part.row_list), *share.shape[1:])
        share.index_add_(0, part.rows, rows_share)


def _on(selector: slice | torch.Tensor, device: torch.device) -> slice | torch.Tensor:
    return selector if isinstance(selector, slice) else selector.to(device)
