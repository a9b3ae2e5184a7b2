"""How close a PEFT adapter on the base comes to the delta's own apply: mean per-token KL on a few tokens."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deltakit.errors import UsageError
from deltakit.eval.delta_model import load_delta_model


def _tokens(base: Path, text: str | None, count: int, vocab: int) -> torch.Tensor:
    """(1, count) int64 ids: the tokenized ``text`` (base's tokenizer) or seeded random ids without it."""
    if text is not None:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(base)(text, return_tensors="pt")["input_ids"][:, :count]
        if ids.shape[1] >= 2:
            return ids
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (1, count), generator=generator)


def adapter_kl(
    base: str | os.PathLike[str],
    delta: str | os.PathLike[str],
    adapter: str | os.PathLike[str],
    *,
    text: str | None = None,
    tokens: int = 64,
) -> float:
    """Mean KL(delta apply ‖ base + adapter) per token, in nats, fp32 on the CPU. Needs ``peft``."""
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError("the KL check needs peft: pip install 'deltakit-llm[peft]'") from None
    reference = load_delta_model(base, delta)
    plain = load_delta_model(base, None)
    model = PeftModel.from_pretrained(plain, str(adapter)).eval()
    ids = _tokens(Path(base), text, tokens, reference.config.vocab_size)
    with torch.no_grad():
        p = torch.log_softmax(reference(ids).logits.float(), -1)
        q = torch.log_softmax(model(ids).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())
