"""Progressive Module Replacement (BERT-of-Theseus) and logit distillation losses.

During PMR each compressed module stands in for its original with probability ``p``; ``p`` ramps from a
start value to 1 so the student is a mix of original and compressed modules early on and fully compressed
by the end. ``p == 1`` throughout is plain distillation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PMRSchedule:
    """Replacement probability per step: ``p(t) = min(1, start + (1 - start) * t / (ramp * total))``.

    start: p at step 0 (1.0 = plain distillation); ramp: fraction of the run over which p reaches 1;
    total: number of optimiser steps. The linear ramp is BERT-of-Theseus' scheduler ``min(1, k·t + b)``.
    """

    start: float = 0.5
    ramp: float = 0.7
    total: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= 1.0:
            raise ValueError(f"PMR start probability must be in [0, 1], got {self.start}")
        if not 0.0 < self.ramp <= 1.0:
            raise ValueError(f"PMR ramp must be in (0, 1], got {self.ramp}")

    def p(self, step: int) -> float:
        span = max(1.0, self.ramp * self.total)
        return min(1.0, self.start + (1.0 - self.start) * step / span)

    def sample(self, step: int, count: int, seed: int) -> torch.Tensor:
        """(count,) bool: which of ``count`` modules are replaced at ``step``; a pure function of (seed, step).

        At least one module is replaced whenever ``count > 0`` so every step trains something.
        """
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        mask = torch.rand(count, generator=generator) < self.p(step)
        if count and not bool(mask.any()):
            mask[int(torch.randint(count, (1,), generator=generator))] = True
        return mask


def logit_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) on softmax(logits / T), times T² (fp32 scalar).

    student_logits, teacher_logits: (..., vocab), any float dtype (cast to fp32); not mutated.
    """
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
