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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from deltakit.errors import UsageError
from deltakit.runtime.hotswap import HotSwapRuntime
from deltakit.runtime.kernels import embedding_delta, linear_delta, sign_matrix
from deltakit.runtime.lru import ByteLRU
from deltakit.runtime.prepared import PreparedDelta, TensorOp

_guard = threading.local()


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

    sign_cache_bytes: budget for unpacked ±1 sign matrices (fp32, on the device) reused across the
    forward passes of a generation; 0 unpacks on every forward.
    """

    def __init__(self, runtime: HotSwapRuntime, *, sign_cache_bytes: int = 256 << 20):
        self.runtime = runtime
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
            rows = {
                name: torch.tensor([i for i, a in enumerate(assignment) if a == name], device=runtime.device)
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
        rows: dict[str, torch.Tensor],
        batch: int,
    ):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            if getattr(_guard, "active", False):
                return None
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

        return hook

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
            return self._dense_rerun(module, attr_ops, prepared, x, args, kwargs)
        out = base_out.to(torch.float32)
        if weight is not None:
            if layout == "embedding":
                out = out + embedding_delta(x, weight)
            else:
                signs = self._signs(prepared.name, weight) if "signs" in weight.tensors else None
                out = out + linear_delta(x, weight, layout, signs)
        if bias is not None:
            pristine = self.runtime.resident.pristine(bias.name).to(out.device, torch.float32)
            out = out + (bias.tensors["value"].to(out.device, torch.float32) - pristine)
        return out

    def _signs(self, delta: str, op: TensorOp) -> torch.Tensor:
        key = f"{delta}\0{op.name}"
        cached = self.sign_cache.get(key)
        if cached is not None and cached[0] is op.tensors["signs"]:
            return cached[1]
        dense = sign_matrix(op)
        self.sign_cache.put(key, (op.tensors["signs"], dense))
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
