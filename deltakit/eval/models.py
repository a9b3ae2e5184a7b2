"""Loading the models and tokenizers that evaluation compares, from checkpoint dirs, delta dirs or modules."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from deltakit.errors import FormatError


def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """True for a Hugging Face checkpoint dir (has ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def is_delta_dir(path: str | os.PathLike[str]) -> bool:
    """True for a deltakit delta dir (has ``manifest.json`` and no ``config.json``)."""
    p = Path(path)
    return (p / "manifest.json").is_file() and not (p / "config.json").is_file()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' info logs and tqdm bars for the duration (library code must not spam stderr)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(
    source: str | os.PathLike[str] | torch.nn.Module, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A causal LM in eval mode: ``source`` is a module (returned as is) or a HF checkpoint dir.

    Weights stored in bf16 are upcast to ``dtype`` (float32 by default) so measures are not dominated by
    bf16 matmul round-off. Runs on CPU.
    """
    if isinstance(source, torch.nn.Module):
        return source.eval()
    path = Path(source)
    from deltakit.core.model_mode import is_compressed_model
    from deltakit.core.model_mode import load_model as load_compressed

    if is_compressed_model(path):  # lillama / deltallm: their own modules, not the source architecture
        return load_compressed(path).to(dtype).eval()
    if not is_checkpoint_dir(path):
        raise FormatError(f"not a Hugging Face checkpoint dir (no config.json): {path}")
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def load_tokenizer(path: str | os.PathLike[str]):
    """The tokenizer saved in a HF checkpoint dir."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(Path(path))


def reconstruct(
    base_dir: str | os.PathLike[str], delta_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> Path:
    """Materialise base + delta as a HF checkpoint dir at ``out_dir`` through ``deltakit.apply``."""
    from deltakit.core.apply import apply

    apply(base_dir, delta_dir, out_dir)
    return Path(out_dir)
