"""Batches whose rows use different deltas, without merging: base forward once, plus per-row deltas.

Inside ``with executor.assign(["chat", None, "code", "chat"]):`` every forward pass of the resident model
(which holds the *base* weights) gets, through forward hooks on the modules whose parameters the deltas
touch, each row's delta added to that module's output:

- Linear / GPT-2 Conv1D weights of ``dqrelo``, ``bitdelta`` and ``svd`` deltas: the sign part
  (unpacked bits x scale) and the low-rank part (x·downᵀ·upᵀ) per group of rows (:mod:`.kernels`), and a
  changed bias as ``b_ft − b_base``;
- embedding tables of those codecs: the rows of Δ for the looked-up ids;
- anything else (norm weights stored exactly, other codecs): the module is re-run on the group's rows
  with the dense rebuilt parameters (correct for any module that treats batch rows independently).

Row i of every module input must be row i of the batch (true for decoder-only models with a KV cache).
Hooks exist only inside ``assign``; outside it the model is untouched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deltakit.errors import UsageError
from deltakit.runtime.hotswap import HotSwapRuntime
from deltakit.runtime.kernels import embedding_delta, low_rank_share, sign_matrix, sign_share
from deltakit.runtime.lru import ByteLRU
from deltakit.runtime.prepared import PreparedDelta, TensorOp

_guard = threading.local()
COST_KEYS = ("sign_s", "low_rank_s", "dense_s", "hooks_s")


def row_selector(rows: list[int]) -> slice | torch.Tensor:
    """A slice when ``rows`` are consecutive (a view, no gather), else an index tensor (CPU)."""
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, dtype=torch.int64)


def module_layout(module: nn.Module) -> str | None:
    """``out_in`` for nn.Linear, ``in_out`` for GPT-2 style Conv1D, ``embedding``, else None."""
    if isinstance(module, nn.Linear):
        return "out_in"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "in_out"
    return None


class MultiDeltaExecutor:
    """Runs mixed-delta batches on a :class:`HotSwapRuntime`'s resident model.

    sign_cache_bytes: budget for unpacked ±1 sign matrices (on the device, in the activations' dtype:
    fp32 for fp32 models, bf16/fp16 for 16-bit ones) reused across the forward passes of a
    generation; 0 unpacks on every forward.
    profile: accumulate the seconds spent in each part of the delta shares in :attr:`costs`
    (``sign_s``, ``low_rank_s``, ``dense_s``, ``hooks_s``; the device is synchronised around each part,
    which slows the forward a little). The base matmuls are the forward's time minus ``hooks_s``.
    """

    def __init__(self, runtime: HotSwapRuntime, *, sign_cache_bytes: int = 256 << 20, profile: bool = False):
        self.runtime = runtime
        self.profile = profile
        self.costs: dict[str, float] = dict.fromkeys(COST_KEYS, 0.0)
        self.sign_cache: ByteLRU[tuple[torch.Tensor, torch.Tensor]] = ByteLRU(
            sign_cache_bytes, lambda item: item[1].numel() * item[1].element_size()
        )
        # parameter identity -> [(module, attribute)] for every module holding it (tied weights: several)
        self._users: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in runtime.model.modules():
            for attr, param in module.named_parameters(recurse=False):
                self._users.setdefault(id(param), []).append((module, attr))

    @contextmanager
    def assign(self, assignment: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i runs with delta ``assignment[i]`` (None: the base).

        Activates the base first (a swap), holds the runtime lock for the whole block, and removes the
        hooks on exit.
        """
        runtime = self.runtime
        with runtime.lock:
            runtime.activate(None)
            deltas: dict[str, PreparedDelta] = {}
            for name in dict.fromkeys(a for a in assignment if a is not None):
                deltas[name] = runtime.device_delta(name)[0]
            rows = {  # grouped once per batch: every hook reuses these selectors
                name: _on(row_selector([i for i, a in enumerate(assignment) if a == name]), runtime.device)
                for name in deltas
            }
            per_module: dict[nn.Module, dict[str, dict[str, TensorOp]]] = {}
            for name, prepared in deltas.items():
                for canonical, op in prepared.ops.items():
                    param = runtime.resident.param(canonical)
                    users = self._users.get(id(param))
                    if not users:
                        raise UsageError(
                            f"parameter {canonical} is used by no module: cannot batch delta {name!r}"
                        )
                    for module, attr in users:
                        per_module.setdefault(module, {}).setdefault(name, {})[attr] = op
            handles = []
            try:
                for module, ops in per_module.items():
                    hook = self._make_hook(ops, deltas, rows, len(assignment))
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
                yield
            finally:
                for handle in handles:
                    handle.remove()

    def _make_hook(
        self,
        ops: dict[str, dict[str, TensorOp]],
        deltas: dict[str, PreparedDelta],
        rows: dict[str, slice | torch.Tensor],
        batch: int,
    ):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            if getattr(_guard, "active", False):
                return None
            start = self._tick(output)
            result = self._hook_body(module, args, kwargs, output, ops, deltas, rows, batch)
            self._tock("hooks_s", start, result)
            return result

        return hook

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

    def _hook_body(
        self,
        module: nn.Module,
        args: tuple,
        kwargs: dict,
        output: torch.Tensor,
        ops: dict[str, dict[str, TensorOp]],
        deltas: dict[str, PreparedDelta],
        rows: dict[str, slice | torch.Tensor],
        batch: int,
    ) -> torch.Tensor:
        """The hook's work: base output plus every row group's delta share."""
        x = args[0] if args else next(iter(kwargs.values()))
        if x.shape[0] == 1 and batch > 1:  # broadcast input (GPT-2's position ids): same for every row
            x = x.expand(batch, *x.shape[1:])
            output = output.expand(batch, *output.shape[1:])
        elif x.shape[0] != batch:
            raise UsageError(f"module input has {x.shape[0]} rows, the delta assignment has {batch}")
        result = output.clone()
        for name, attr_ops in ops.items():
            idx = rows[name]
            new = self._rows_output(module, attr_ops, deltas[name], x[idx], output[idx], args, kwargs)
            result[idx] = new.to(result.dtype)
        return result

    def _rows_output(
        self,
        module: nn.Module,
        attr_ops: dict[str, TensorOp],
        prepared: PreparedDelta,
        x: torch.Tensor,
        base_out: torch.Tensor,
        args: tuple,
        kwargs: dict,
    ) -> torch.Tensor:
        """Output rows of ``module`` under one delta: base output + delta share, or a dense re-run."""
        layout = module_layout(module)
        weight, bias = attr_ops.get("weight"), attr_ops.get("bias")
        fast = (
            prepared.factored
            and layout is not None
            and set(attr_ops) <= {"weight", "bias"}
            and (weight is None or weight.kind == "encoded")
            and (bias is None or (bias.kind == "passthrough" and layout != "embedding"))
        )
        if not fast:
            start = self._tick(x)
            dense = self._dense_rerun(module, attr_ops, prepared, x, args, kwargs)
            self._tock("dense_s", start, dense)
            return dense
        out = base_out.to(torch.float32)
        if weight is not None:
            view = weight.view
            if layout == "embedding":
                out = out + embedding_delta(x, weight)
            else:
                if view.signs is not None:
                    start = self._tick(x)
                    out = out + sign_share(x, weight, layout, self._signs(prepared.name, weight, x.dtype))
                    self._tock("sign_s", start, out)
                if view.up is not None:
                    start = self._tick(x)
                    out = out + low_rank_share(x, weight, layout)
                    self._tock("low_rank_s", start, out)
        if bias is not None:
            pristine = self.runtime.resident.pristine(bias.name).to(out.device, torch.float32)
            out = out + (bias.tensors["value"].to(out.device, torch.float32) - pristine)
        return out

    def _signs(self, delta: str, op: TensorOp, activations: torch.dtype) -> torch.Tensor:
        """The ±1 matrix of ``op`` in the dtype the product is taken in (16-bit activations: theirs)."""
        dtype = activations if activations in (torch.bfloat16, torch.float16) else torch.float32
        key = f"{delta}\0{op.name}\0{dtype}"
        packed = op.view.signs
        cached = self.sign_cache.get(key)
        if cached is not None and cached[0] is packed:
            return cached[1]
        dense = sign_matrix(op, dtype)
        self.sign_cache.put(key, (packed, dense))
        return dense

    def _dense_rerun(
        self,
        module: nn.Module,
        attr_ops: dict[str, TensorOp],
        prepared: PreparedDelta,
        x: torch.Tensor,
        args: tuple,
        kwargs: dict,
    ) -> torch.Tensor:
        """Fallback: rebuild the changed parameters densely and run the module on these rows."""
        resident = self.runtime.resident
        params = {}
        for attr, op in attr_ops.items():
            pristine = resident.pristine(op.name).to(self.runtime.device)
            served = resident.param(op.name).dtype
            params[attr] = HotSwapRuntime._rebuild(prepared, op, pristine).to(served)
        _guard.active = True
        try:
            return torch.func.functional_call(module, params, (x, *args[1:]), kwargs)
        finally:
            _guard.active = False


def _on(selector: slice | torch.Tensor, device: torch.device) -> slice | torch.Tensor:
    return selector if isinstance(selector, slice) else selector.to(device)
