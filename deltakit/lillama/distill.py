"""Local feature distillation of one decoder block, and the block-by-block driver.

Per-token loss (Lillama): ``mean_h |s − t| − log σ(cos(s, t))`` for student output s and teacher output t
(both (batch, seq, hidden)), averaged over tokens. Variants:

- ``joint``: the student block is run on the teacher's block input and, separately, on the previous
  student block's output; both outputs are compared with the teacher block's output and the two losses are
  summed before one optimizer step;
- ``teacher``: teacher input only; ``student``: previous-student input only.

Gradients stay inside the block: its inputs are detached tensors read from memory, so autograd holds one
block and one minibatch of activations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltakit.distill.data import iter_minibatches
from deltakit.lillama.blocks import block_outputs, kwargs_on, run_block

LOSS_CHOICES = ("joint", "teacher", "student")
#: called as progress(done, total, label)
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class DistillSettings:
    """Optimizer and loss settings of the block distillation (see :class:`deltakit.codecs.lillama.LillamaConfig`)."""

    lr: float = 1e-3
    batch_size: int = 8
    epochs: int = 1
    loss: str = "joint"
    weight_decay: float = 0.0
    eval_windows: int = 8
    seed: int = 0


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Scalar Lillama loss: per token L1 (mean over hidden) − log σ(cosine), averaged over tokens.

    student, teacher: (batch, seq, hidden), same dtype; teacher carries no gradient.
    """
    l1 = (student - teacher).abs().mean(-1)  # (batch, seq)
    cos = F.cosine_similarity(student, teacher, dim=-1)  # (batch, seq)
    return (l1 - F.logsigmoid(cos)).mean()


@torch.no_grad()
def block_loss(
    student: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict[str, Any],
    device: torch.device,
    batch_size: int,
) -> float:
    """Mean :func:`feature_loss` of ``student`` on ``inputs`` against ``targets`` ((n, seq, hidden) CPU)."""
    total, count = 0.0, 0
    for start in range(0, inputs.shape[0], batch_size):
        x = inputs[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        total += float(feature_loss(run_block(student, x, kwargs).float(), y)) * x.shape[0]
        count += x.shape[0]
    return total / max(count, 1)


def train_block(
    student: nn.Module,
    teacher_in: torch.Tensor,
    student_in: torch.Tensor,
    teacher_out: torch.Tensor,
    kwargs: dict[str, Any],
    settings: DistillSettings,
    device: torch.device,
    *,
    seed: int = 0,
    on_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Distil ``student`` (mutated: its trainable parameters are updated in place) towards ``teacher_out``.

    student: the block on ``device``; only parameters with ``requires_grad`` are trained (AdamW).
    teacher_in, student_in, teacher_out: (n, seq, hidden) fp32 on the CPU (not mutated); kwargs on ``device``.
    Returns losses on the first ``settings.eval_windows`` windows before and after training (``teacher``:
    fed the teacher's input, ``student``: fed the previous student's output), the step count and seconds.
    """
    started = time.perf_counter()
    params = [p for p in student.parameters() if p.requires_grad]
    n_eval = min(settings.eval_windows, teacher_in.shape[0])

    def evaluate() -> dict[str, float]:
        return {
            "teacher_input": block_loss(
                student, teacher_in[:n_eval], teacher_out[:n_eval], kwargs, device, settings.batch_size
            ),
            "student_input": block_loss(
                student, student_in[:n_eval], teacher_out[:n_eval], kwargs, device, settings.batch_size
            ),
        }

    before = evaluate()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    index = torch.arange(teacher_in.shape[0])
    steps, last = 0, math.nan
    for batch in iter_minibatches(index, settings.batch_size, seed=seed, epochs=settings.epochs):
        y = teacher_out[batch].to(device)  # (batch, seq, hidden)
        loss = torch.zeros((), device=device)
        if settings.loss in ("joint", "teacher"):
            loss = loss + feature_loss(run_block(student, teacher_in[batch].to(device), kwargs).float(), y)
        if settings.loss in ("joint", "student"):
            loss = loss + feature_loss(run_block(student, student_in[batch].to(device), kwargs).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        last = float(loss.detach())
        if on_step is not None:
            on_step()
    after = evaluate()
    return {
        "before": before,
        "after": after,
        "steps": steps,
        "last_train_loss": last,
        "seconds": round(time.perf_counter() - started, 3),
    }


def steps_per_block(windows: int, settings: DistillSettings) -> int:
    return math.ceil(windows / settings.batch_size) * settings.epochs


def distill_blocks(
    teacher_blocks: nn.ModuleList,
    make_student: Callable[[int], nn.Module],
    active: list[int],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    settings: DistillSettings,
    device: torch.device,
    *,
    student_hidden: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> tuple[dict[int, nn.Module], list[dict[str, Any]]]:
    """Distil block by block; returns the trained students ``{block index: module on the CPU}`` and reports.

    teacher_blocks: the teacher's decoder blocks on the CPU (each moved to ``device`` for its turn and back;
    not otherwise mutated). active: indices of the blocks to distil; make_student(i) builds a fresh student
    for block i on the CPU (trainable parameters marked), called only when its turn comes. Other blocks stay
    as they are (the student runs the teacher block).
    hidden: (n, seq, hidden) fp32 CPU teacher inputs of block 0; student_hidden: the student's own inputs of
    block 0 when they differ (delta mode: the reconstructed embedding). Blocks after the last student are
    not run. Memory: four (n, seq, hidden) fp32 tensors on the CPU (teacher in/out, student in/out).
    """
    students: dict[int, nn.Module] = {}
    reports: list[dict[str, Any]] = []
    dev_kwargs = kwargs_on(kwargs, device)
    per_block = steps_per_block(hidden.shape[0], settings)
    x_t = hidden
    x_s = hidden if student_hidden is None else student_hidden
    last = max(active) if active else -1
    total = per_block * len(active)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, f"block {current}")

    for current in range(last + 1):
        teacher = teacher_blocks[current].to(device)
        y_t = block_outputs(teacher, x_t, dev_kwargs, device, settings.batch_size)  # (n, seq, hidden)
        if current not in active:
            if x_s is not x_t:
                x_s = block_outputs(teacher, x_s, dev_kwargs, device, settings.batch_size)
            else:
                x_s = y_t
            teacher_blocks[current].to("cpu")
            x_t = y_t
            continue
        teacher_blocks[current].to("cpu")
        student = make_student(current).to(device)
        report = train_block(
            student, x_t, x_s, y_t, dev_kwargs, settings, device, seed=settings.seed + current, on_step=tick
        )
        report["block"] = current
        reports.append(report)
        x_s = block_outputs(student, x_s, dev_kwargs, device, settings.batch_size)
        x_t = y_t
        for p in student.parameters():
            p.requires_grad_(False)
        students[current] = student.to("cpu")
    if progress is not None:
        progress(total, total, "")
    return students, reports
