"""Delta mode: distil the low-rank factors of a fine-tune's delta so that base + up·down matches the
fine-tuned blocks.

Teacher: the fine-tuned block. Student: a copy of it whose Linears compute ``x (W_base + up·down)ᵀ + b``
(:class:`DeltaLinear`), with ``up``/``down`` initialised from the truncated SVD of Δ = W_ft − W_base; norms
and biases are the fine-tune's, which the delta format stores exactly. The student chain starts from the
reconstructed embedding (base + its low-rank delta) when the embedding changed.

Memory: base and fine-tune on the CPU in fp32, four (windows, seq, hidden) fp32 activation tensors on
the CPU, one block on the compute device.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltakit.lillama.blocks import block_linears, capture_block_inputs, decoder_layers
from deltakit.lillama.distill import DistillSettings, Progress, distill_blocks
from deltakit.lillama.lowrank import DeltaLinear, set_submodule, svd_factors
from deltakit.lillama.model import check_windows, quiet_load

#: rank_for(tensor name, (rows, cols)) -> rank; seed_for(tensor name) -> SVD seed
RankFn = Callable[[str, tuple[int, int]], int]
SeedFn = Callable[[str], int]


def _param_name(model: nn.Module, tensor: torch.Tensor) -> str | None:
    for name, param in model.named_parameters():
        if param is tensor:
            return name
    return None


def _embedding_factors(
    target: nn.Module,
    base: nn.Module,
    windows: torch.Tensor,
    settings: DistillSettings,
    rank_for: RankFn,
    seed_for: SeedFn,
    svd_kwargs: dict[str, Any],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> Any:
    """SVD factors of a changed input embedding (added to ``factors``) and the block inputs the student
    sees with it, or None when the embedding is unchanged (the target is restored afterwards)."""
    emb_t, emb_b = target.get_input_embeddings().weight, base.get_input_embeddings().weight
    emb_name = _param_name(target, emb_t)
    if emb_name is None or emb_t.shape != emb_b.shape or torch.equal(emb_t, emb_b):
        return None
    rank = rank_for(emb_name, tuple(emb_t.shape))
    up, down = svd_factors(emb_t.detach() - emb_b.detach(), rank, seed=seed_for(emb_name), **svd_kwargs)
    factors[emb_name] = (up, down)
    original = emb_t.data
    emb_t.data = emb_b.detach().float() + up @ down  # (vocab, hidden)
    try:
        student_hidden, _ = capture_block_inputs(target, windows, settings.batch_size)
    finally:
        emb_t.data = original
    return student_hidden


def distill_delta(
    base_dir: Path,
    target_dir: Path,
    *,
    windows: torch.Tensor,
    settings: DistillSettings,
    modules: str,
    rank_for: RankFn,
    seed_for: SeedFn,
    svd_kwargs: dict[str, Any],
    device: torch.device,
    progress: Progress | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Refined fp32 factors ``{weight name: (up (out, r), down (r, in))}`` on the CPU, and a report.

    Every changed Linear of every block gets factors; those outside ``modules`` keep their SVD
    initialisation (frozen), the others are distilled. A changed input embedding of the same shape gets its
    SVD factors too (used for the student's inputs, not trained). Inputs are not mutated.
    """
    started = time.perf_counter()
    check_windows(windows, settings.batch_size)
    base, target = quiet_load(base_dir), quiet_load(target_dir)
    prefix, t_layers = decoder_layers(target)
    _, b_layers = decoder_layers(base)
    if len(t_layers) != len(b_layers):
        raise ValueError(f"base has {len(b_layers)} blocks, fine-tune {len(t_layers)}")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    hidden, kwargs = capture_block_inputs(target, windows, settings.batch_size)
    student_hidden = _embedding_factors(
        target, base, windows, settings, rank_for, seed_for, svd_kwargs, factors
    )
    trainable = {local for local, _ in block_linears(t_layers[0], modules)}

    def make_student(index: int) -> nn.Module:
        student = copy.deepcopy(t_layers[index])
        for p in student.parameters():
            p.requires_grad_(False)
        for local, linear in list(block_linears(student, "all")):
            w_b = b_layers[index].get_submodule(local).weight.detach()  # (out, in)
            w_t = linear.weight.detach()
            if w_b.shape != w_t.shape or torch.equal(w_b, w_t):
                continue
            name = f"{prefix}.{index}.{local}.weight"
            up, down = svd_factors(
                w_t - w_b, rank_for(name, tuple(w_t.shape)), seed=seed_for(name), **svd_kwargs
            )
            set_submodule(
                student, local, DeltaLinear(w_b, up, down, linear.bias, trainable=local in trainable)
            )
        return student

    students, reports = distill_blocks(
        t_layers,
        make_student,
        list(range(len(t_layers))),
        hidden,
        kwargs,
        settings,
        device,
        student_hidden=student_hidden,
        progress=progress,
    )
    for index, student in students.items():
        for local, module in student.named_modules():
            if isinstance(module, DeltaLinear):
                factors[f"{prefix}.{index}.{local}.weight"] = (
                    module.up.detach().cpu(),
                    module.down.detach().cpu(),
                )
    report = {
        "blocks": reports,
        "factorised": len(factors),
        "calibration_tokens": int(windows.numel()),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return factors, report
