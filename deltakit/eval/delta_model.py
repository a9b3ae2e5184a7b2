"""A base + delta causal LM built in memory (no merged checkpoint on disk), for evaluation harnesses.

The base directory gives the architecture (``config.json``) and the tokenizer; :func:`deltakit.apply`
gives the fine-tune's tensors, which replace the base's weights in the loaded module. Peak memory is
about two copies of the model (the module and the applied state dict), briefly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deltakit.errors import FormatError, TensorMismatchError
from deltakit.eval.models import is_checkpoint_dir, quiet_transformers


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that share storage with another parameter (tied embeddings and lm_head)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        key = param.data_ptr()
        if key in seen:
            tied.update((name, seen[key]))
        else:
            seen[key] = name
    return tied


def load_delta_model(
    base: str | os.PathLike[str],
    delta: str | os.PathLike[str] | None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The causal LM ``base + delta`` in eval mode, on ``device`` in ``dtype`` (float32 by default).

    base: a Hugging Face checkpoint directory; delta: a delta directory, or ``None`` for the base alone.
    Raises TensorMismatchError when the applied tensors do not fit the base's architecture.
    """
    base = Path(base)
    if not is_checkpoint_dir(base):
        raise FormatError(f"base must be a Hugging Face checkpoint dir (no config.json in {base})")
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if delta is not None:
        from deltakit.core.apply import apply

        state = apply(base, delta, None).state_dict  # the fine-tune's tensors, checkpoint names
        result = model.load_state_dict(state, strict=False)
        missing = set(result.missing_keys) - _tied_names(model)
        if result.unexpected_keys or missing:
            raise TensorMismatchError(
                f"delta tensors do not fit the base architecture (unexpected: "
                f"{sorted(result.unexpected_keys)[:3]}, missing: {sorted(missing)[:3]})"
            )
        del state
    return model.to(device).eval()
