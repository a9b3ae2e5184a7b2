"""Baselines at equal parameters removed: ShortGPT-style block dropping and plain truncated SVD.

- Block influence (ShortGPT): ``BI_i = 1 − mean_tokens cos(h_in_i, h_out_i)`` on calibration data; blocks
  with the lowest influence are dropped first.
- Plain SVD: the same matrices as DeltaLLM's followers replaced by their own rank-r truncated SVD (no anchor),
  which at the same rank removes exactly the same number of parameters.
All functions work on a loaded transformers Llama-style model and mutate it in place (trailing underscore).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deltakit.deltallm.modules import LowRankLinear, get_module, set_module, svd_factors
from deltakit.deltallm.plan import SharingPlan


def decoder_layers(model: nn.Module, prefix: str = "model.layers") -> nn.ModuleList:
    layers = model.get_submodule(prefix)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{prefix} is {type(layers).__name__}, expected a ModuleList of decoder blocks")
    return layers


@torch.no_grad()
def block_influence(
    model: nn.Module, windows: torch.Tensor, *, batch_size: int = 4, prefix: str = "model.layers"
) -> list[float]:
    """ShortGPT block influence per decoder block: 1 − mean cosine(input, output) over every token.

    windows: (n, seq_len) int64 calibration tokens. The model is run in eval mode; not mutated
    (hooks are removed afterwards). Returns one float per block, higher = more important.
    """
    layers = decoder_layers(model, prefix)
    sums = [0.0] * len(layers)
    count = 0
    hooks = []

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]  # (b, seq, d)
            hidden_out = output[0] if isinstance(output, tuple) else output  # (b, seq, d)
            cos = torch.nn.functional.cosine_similarity(
                hidden_in.float(), hidden_out.float(), dim=-1
            )  # (b, seq)
            sums[index] += float((1.0 - cos).sum())

        return hook

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(make_hook(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            model(batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [s / max(count, 1) for s in sums]


def blocks_to_drop(influence: list[float], count: int, keep_first: int = 0, keep_last: int = 0) -> list[int]:
    """The ``count`` least influential blocks (ascending influence), never the protected first/last ones."""
    n = len(influence)
    candidates = [i for i in range(keep_first, n - keep_last)]
    if count > len(candidates):
        raise ValueError(f"cannot drop {count} of {len(candidates)} droppable blocks")
    return sorted(sorted(candidates, key=lambda i: influence[i])[:count])


def drop_count_for(removed_target: int, layer_params: int) -> int:
    """Number of whole blocks whose removal is closest to ``removed_target`` elements (at least 1)."""
    return max(1, round(removed_target / layer_params))


def drop_blocks_(model: nn.Module, drop: list[int], prefix: str = "model.layers") -> nn.Module:
    """Remove decoder blocks ``drop`` (in place); renumbers attention ``layer_idx`` and fixes the config."""
    layers = decoder_layers(model, prefix)
    keep = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    parent, _, child = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.ModuleList(keep))
    for new_index, layer in enumerate(keep):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(drop)]
    config.num_hidden_layers = len(keep)
    return model


@torch.no_grad()
def svd_baseline_(model: nn.Module, modules: list[str], rank: int, seed: int = 0) -> nn.Module:
    """Replace each named nn.Linear by its rank-``rank`` truncated SVD, a :class:`LowRankLinear` (in place).

    Factors are computed in fp32 and stored in the weight's dtype.
    """
    for name in modules:
        linear = get_module(model, name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is {type(linear).__name__}, expected nn.Linear")
        a, b = svd_factors(linear.weight, rank, seed=seed)  # (out, r), (r, in)
        dtype = linear.weight.dtype
        set_module(model, name, LowRankLinear(a.to(dtype), b.to(dtype), linear.bias))
    return model


def svd_modules(plan: SharingPlan) -> list[str]:
    """The follower matrices of ``plan``: the SVD baseline's targets at the plan's rank."""
    return [f for f, _ in plan.shared_modules()]


def svd_rank_for(plan: SharingPlan, modules_per_block: int, blocks: int, removed_target: int) -> int:
    """Uniform rank for plain SVD of ``blocks`` × the plan's kinds removing about ``removed_target`` elements."""
    shapes = [plan.shapes[k] for k in plan.kinds]
    full = sum(o * i for o, i in shapes) * blocks
    per_rank = sum(o + i for o, i in shapes) * blocks
    return max(1, math.floor((full - removed_target) / per_rank))
