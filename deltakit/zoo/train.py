"""Fine-tuning one fleet variant on CPU: full fine-tune of every non-embedding weight, fp32 master weights.

Why these choices:
- embeddings (tied with the LM head in SmolLM2) are frozen: they are 21% of the parameters and most of the
  backward cost, and deltas of real instruction fine-tunes concentrate in the transformer blocks;
- AdamW with warmup + cosine decay, fp32 training, saved in bf16 like real fleets; the stored bf16 weights are
  what the recipe's "after" perplexity measures (the fine-tune is rounded to bf16 before evaluation);
- batches are random windows of the training text drawn from a seeded generator, so a recipe + seed gives
  the same variant on the same software stack.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deltakit.eval.lm import tokenize
from deltakit.eval.models import load_model, load_tokenizer

StepFn = Callable[[int, int, float], None]
"""Called as ``on_step(step, total_steps, loss)`` after each optimizer step."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a variant's weights (what the cache compares before reusing one)."""

    domain: str
    steps: int = 40
    lr: float = 3e-4
    batch_size: int = 4
    seq_len: int = 64
    warmup_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    split_seed: int = 0
    freeze: tuple[str, ...] = ("embed_tokens",)
    save_dtype: str = "bfloat16"

    def to_json(self) -> dict:
        d = asdict(self)
        d["freeze"] = list(self.freeze)
        return d


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine decay to 10% of ``lr`` (step is 0-based)."""
    warm = max(1, int(recipe.warmup_frac * recipe.steps))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, recipe.steps - warm)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def sample_batch(ids: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    """``(batch_size, seq_len)`` long tensor of random windows of the 1-D token ids."""
    starts = torch.randint(0, len(ids) - recipe.seq_len, (recipe.batch_size,), generator=gen)
    return torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])


def finetune(
    base_dir: str | Path,
    train_text: str,
    recipe: Recipe,
    on_step: StepFn | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.nn.Module, dict]:
    """Fine-tune the base on ``train_text``; returns (the model in fp32 on CPU, training stats).

    The returned model's weights are already rounded to ``recipe.save_dtype`` (then held in fp32), so
    evaluating it measures exactly what will be saved. Training uses at most ~8M characters of the text.
    device: where the steps run (``cuda``: minutes for recipes that take hours on a few CPU cores); the
    batches are drawn on the CPU either way, but the arithmetic, and so the weights, differ by device.
    """
    device = torch.device(device)
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, dtype=torch.float32).to(device)
    ids = tokenize(tokenizer, train_text[:8_000_000])
    if len(ids) <= recipe.seq_len:
        raise ValueError(f"training text too short: {len(ids)} tokens for seq_len {recipe.seq_len}")
    trainable = []
    for name, p in model.named_parameters():
        frozen = any(f in name for f in recipe.freeze)
        p.requires_grad_(not frozen)
        if not frozen:
            trainable.append(p)
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        batch = sample_batch(ids, recipe, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, recipe.grad_clip)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1, recipe.steps, losses[-1])
    model.eval().to("cpu")
    save_dtype = getattr(torch, recipe.save_dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(save_dtype).float())  # round to the stored precision (what the checkpoint holds)
            p.requires_grad_(False)
    head = sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses) // 10)
    tail = sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10)
    stats = {
        "train_tokens": recipe.steps * recipe.batch_size * recipe.seq_len,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "train_device": device.type,
        "loss_first_10pct": round(head, 4),
        "loss_last_10pct": round(tail, 4),
    }
    return model, stats


def save_checkpoint(model: torch.nn.Module, tokenizer, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Write ``model`` (cast to ``dtype``) and ``tokenizer`` as a HF safetensors checkpoint dir into ``out_dir``.

    The model is cast on a copy of its state; the caller's module is left in fp32.
    """
    from safetensors.torch import save_file

    target = getattr(torch, dtype)
    state = {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # tied to embed_tokens: HF checkpoints store it once
        state[name] = t.detach().to(target).contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    old = config.dtype
    config.dtype = dtype
    try:
        config.save_pretrained(out_dir)
    finally:
        config.dtype = old
    tokenizer.save_pretrained(out_dir)
