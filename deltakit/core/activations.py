"""Input energy of a base model's linear layers on calibration tokens: the weights of a calibration-weighted
rate–distortion allocation.

For a linear layer ``y = W x`` a weight error ``E`` changes the output by ``E x``; over the inputs
``E‖E x‖² = tr(E Σ Eᵀ)`` with ``Σ = E[x xᵀ]``. Replacing ``Σ`` by ``σ̄² I``, ``σ̄² = mean(diag Σ) =
E‖x‖² / in_features`` (the average input energy per input feature), gives ``σ̄² ‖E‖²_F``: the Frobenius
error the allocator already models, times one scalar per matrix. The estimate is exact when the input
features are uncorrelated with equal energy, and it ignores which directions of ``E`` meet the large
directions of ``Σ``; it ranks matrices by how loud their inputs are, not by how the error aligns with them.

Statistics are collected on the base model (fp32, ``no_grad``) with a forward pre-hook on every
``nn.Linear`` and GPT-2 ``Conv1D``. Each module's weight is matched to a checkpoint tensor by its
parameter name (with or without the model's ``base_model_prefix``). Matrices without statistics
(embeddings, a head tied to the embedding, weights of other module types) get the mean weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltakit.codecs.base import Calibration
from deltakit.core.allocation import Weighting
from deltakit.distill.data import load_tokenizer as load_calibration_tokenizer
from deltakit.errors import NonFiniteError, TensorMismatchError, UsageError
from deltakit.lillama.model import quiet_load
from deltakit.models.checkpoint import TensorSource

#: calibration windows per forward pass (bounds the activation memory, logits included)
BATCH_WINDOWS = 4
#: significant digits kept of each weight, so that float summation order (threads, device) rarely moves it
WEIGHT_DIGITS = 4
#: smallest weight relative to the mean (a matrix whose inputs are all zero still gets a positive weight)
MIN_WEIGHT = 1e-6


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` and GPT-2 style ``Conv1D`` (``nf`` outputs) in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")):
            yield name, module


def input_energy(model: nn.Module, windows: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Per linear module name: the mean of ``x²`` over every token and input feature of its input.

    model: a causal LM already on ``device``; not mutated (hooks are removed on return).
    windows: (n, seq_len) int64 token ids, run ``BATCH_WINDOWS`` at a time in order.
    """
    modules = dict(linear_modules(model))
    sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in modules}
    counts = dict.fromkeys(modules, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("x"))
            if isinstance(x, torch.Tensor):
                sums[name] += x.detach().double().pow(2).sum()
                counts[name] += x.numel()

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], BATCH_WINDOWS):
                model(input_ids=windows[start : start + BATCH_WINDOWS].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: float(sums[name]) / counts[name] for name in modules if counts[name] > 0}


def checkpoint_names(model: nn.Module, module_names: Iterable[str], known: set[str]) -> dict[str, str]:
    """Module name -> the checkpoint tensor holding its weight, for the modules whose weight is in
    ``known`` (tried as ``NAME.weight``, then without the model's ``base_model_prefix``)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found = {}
    for name in module_names:
        param = f"{name}.weight"
        tries = [param] + ([param[len(prefix) + 1 :]] if prefix and param.startswith(prefix + ".") else [])
        match = next((t for t in tries if t in known), None)
        if match is not None:
            found[name] = match
    return found


def load_tokenizer(*paths: Path) -> Any:
    """The tokenizer saved in the first of ``paths`` that has one; UsageError when none has."""
    return load_calibration_tokenizer(*paths, needed_for="calibration-weighted allocation")


def normalised(energy: dict[str, float | None]) -> dict[str, float]:
    """Weights with mean 1 over the measured matrices; unmeasured (None) ones get 1, the mean.

    Each weight is ``energy / mean``, floored at ``MIN_WEIGHT`` and rounded to ``WEIGHT_DIGITS`` digits.
    """
    measured = [e for e in energy.values() if e is not None]
    for name, e in energy.items():
        if e is not None and not math.isfinite(e):
            raise NonFiniteError(f"the base model's inputs to {name} are not finite on the calibration data")
    mean = sum(measured) / len(measured) if measured else 0.0
    weights = {}
    for name, e in energy.items():
        w = 1.0 if e is None or mean <= 0 else max(e / mean, MIN_WEIGHT)
        weights[name] = float(f"{w:.{WEIGHT_DIGITS}g}")
    return weights


def _load_base(base_dir: Path, device: torch.device) -> nn.Module:
    """The base model in fp32 on ``device``; a directory transformers cannot load is a one-line UsageError."""
    try:
        return quiet_load(base_dir, torch.float32).to(device)
    except (OSError, ValueError, KeyError) as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[0][:200] if lines else type(exc).__name__
        raise UsageError(
            f"calibration-weighted allocation cannot load the base model from {base_dir} ({detail})"
        ) from None


def calibration_weighting(
    base: TensorSource,
    target: TensorSource,
    calibration: Calibration,
    names: list[str],
    device: torch.device,
) -> Weighting:
    """Input-energy weights of the encoded matrices ``names`` from the base model run on ``calibration``.

    base, target: checkpoint sources; the base must be a directory (``.path``), its model is loaded in
    fp32 onto ``device``; the tokenizer comes from the base directory, else the fine-tune's. Raises
    UsageError when the base is not a loadable directory, no tokenizer is saved or the data is unusable,
    TensorMismatchError when no linear layer's weight is a tensor of the base checkpoint (names that do
    not match). Nothing is mutated.
    """
    base_dir = getattr(base, "path", None)
    if base_dir is None:
        raise UsageError(
            "calibration-weighted allocation runs the base model: give base as a checkpoint directory, "
            "or drop data="
        )
    dirs = [Path(base_dir)] + ([Path(target.path)] if getattr(target, "path", None) is not None else [])
    windows = calibration.batches(load_tokenizer(*dirs))  # (n, seq_len) int64
    model = _load_base(Path(base_dir), device)
    energy_by_module = input_energy(model, windows, device)
    matched = checkpoint_names(model, energy_by_module, set(base.names()))
    if energy_by_module and not matched:
        raise TensorMismatchError(
            "calibration statistics match no tensor of the base checkpoint: the model's linear layers are "
            "not named as the checkpoint's tensors"
        )
    energy: dict[str, float | None] = dict.fromkeys(names)
    for module, tensor in matched.items():
        if tensor in energy:
            energy[tensor] = energy_by_module[module]
    return Weighting(normalised(energy), energy, tokens=int(windows.numel()))
