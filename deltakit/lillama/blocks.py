"""Decoder blocks of a Hugging Face causal LM: finding them, choosing their Linears, running them alone.

The model is run only up to its first decoder block (a forward pre-hook stops it there) to get the block
inputs (the embeddings) and the keyword arguments every block receives (rotary position embeddings,
causal mask, position ids). From then on each block is run on its own, so only one block needs to be on
the compute device at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltakit.errors import UsageError

ATTENTION, MLP = "attention", "mlp"
MODULE_CHOICES = ("all", ATTENTION, MLP)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are known."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks: the first one with ``config.num_hidden_layers`` entries."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (count is None or len(module) == count):
            return name, module
    raise UsageError(
        f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of {count} blocks)"
    )


def _group_of(block: nn.Module, child_name: str) -> str:
    """``attention`` for a block child that is an attention module, else ``mlp``."""
    child = getattr(block, child_name)
    kind = type(child).__name__.lower()
    if "attention" in kind or child_name in ("self_attn", "attn", "attention"):
        return ATTENTION
    return MLP


def block_linears(block: nn.Module, which: str = "all") -> Iterator[tuple[str, nn.Linear]]:
    """``(path inside the block, Linear)`` for the block's ``nn.Linear`` modules in group ``which``.

    The group of a Linear is that of the block's direct child holding it: the attention module (its class
    name says ``Attention``) or anything else (the MLP). ``which``: ``all``, ``attention`` or ``mlp``.
    """
    if which not in MODULE_CHOICES:
        raise UsageError(f"modules={which!r} is not valid; choose one of {', '.join(MODULE_CHOICES)}")
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear) or not name:
            continue
        if which == "all" or _group_of(block, name.split(".", 1)[0]) == which:
            yield name, module


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One block's output hidden states: (batch, seq, hidden) -> (batch, seq, hidden)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 8
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Inputs of the first decoder block for every window, and the block keyword arguments.

    model: a causal LM on the CPU (not mutated; a temporary hook is removed again).
    windows: (n, seq) int64 token ids. Returns hidden states (n, seq, hidden) fp32 on the CPU and the
    kwargs (captured from a batch of one window: masks and position tensors broadcast over the batch), on
    the CPU, with caching disabled.
    """
    _, layers = decoder_layers(model)
    captured: dict[str, Any] = {}

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    chunks = []
    try:
        for start in range(0, windows.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=windows[start : start + batch_size], use_cache=False)
            chunks.append(captured["hidden"].float().cpu())  # (batch, seq, hidden)
        with contextlib.suppress(_StopForward):
            model(input_ids=windows[:1], use_cache=False)
    finally:
        handle.remove()
    kwargs = dict(captured["kwargs"])
    kwargs["past_key_values"] = None
    kwargs["use_cache"] = False
    kwargs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return torch.cat(chunks), kwargs


def kwargs_on(kwargs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The block kwargs with every tensor (also inside tuples) moved to ``device``."""
    return {k: _to_device(v, device) for k, v in kwargs.items()}


@torch.no_grad()
def block_outputs(
    block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], device: torch.device, batch_size: int = 8
) -> torch.Tensor:
    """``block`` applied to every window: (n, seq, hidden) fp32 CPU -> (n, seq, hidden) fp32 CPU.

    block: already on ``device``; kwargs: already on ``device`` (see :func:`kwargs_on`).
    """
    out = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], batch_size):
        x = hidden[start : start + batch_size].to(device)  # (batch, seq, hidden)
        out[start : start + batch_size] = run_block(block, x, kwargs).float().cpu()
    return out
