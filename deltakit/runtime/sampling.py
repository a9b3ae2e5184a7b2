"""Per-request decoding parameters and next-token choice (greedy, temperature, nucleus)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from deltakit.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy (deterministic)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (0.0 <= self.temperature <= 2.0):
            raise UsageError(f"temperature must be in [0, 2], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Sampler:
    """Chooses tokens for one request; owns its random generator (seeded when ``params.seed`` is set)."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> int:
        """Next token id from fp32 logits (vocab,) on the CPU (not mutated)."""
        if self.params.temperature == 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / self.params.temperature, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly better tokens
            sorted_probs = torch.where(
                before < self.params.top_p, sorted_probs, torch.zeros_like(sorted_probs)
            )
            choice = torch.multinomial(sorted_probs, 1, generator=self.generator)
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=self.generator))
