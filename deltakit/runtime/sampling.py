"""Per-request decoding parameters and next-token choice (greedy, temperature, nucleus)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from deltakit.errors import NonFiniteError, UsageError

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` is greedy (deterministic).

    seed: 0 .. 2**63 - 1 (the range of a torch generator seed); None draws one.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int = 0  # keep the k most likely tokens (0: all)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (0.0 <= self.temperature <= 2.0):
            raise UsageError(f"temperature must be in [0, 2], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.seed is not None and not (0 <= self.seed <= MAX_SEED):
            raise UsageError(f"seed must be in 0 .. 2**63 - 1, got {self.seed}")


@dataclass
class Sampler:
    """Chooses tokens for one request; owns its random generator (seeded when ``params.seed`` is set)."""

    params: SamplingParams
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        seed = self.params.seed if self.params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> int:
        """Next token id from fp32 logits (vocab,) on the CPU (not mutated). NonFiniteError when they hold
        NaN or +Inf, or no finite value: a delta whose values overflow the model's activations gives such
        logits, and a token drawn from them would mean nothing (greedy decoding would pick a NaN's index)."""
        top = float(logits.max())  # NaN when any logit is NaN
        if not math.isfinite(top):
            raise NonFiniteError(
                "the model's next-token logits hold NaN or Inf: the delta, or the base, gives non-finite "
                "activations"
            )
        if self.params.temperature == 0.0:
            return int(torch.argmax(logits))
        if 0 < self.params.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.params.top_k).values[-1]
            logits = torch.where(logits >= kth, logits, torch.full_like(logits, float("-inf")))
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
