"""Distilling the low-rank deltas from the original model, with Progressive Module Replacement.

One model plays both roles: every :class:`DeltaLinear` keeps the follower's original weight as a buffer, so
the teacher is the same network with every follower block switched to its original path (exactly the
original model), and the student has a sampled subset of follower blocks switched to ``W_anchor + A B``.
Only the A, B factors train (Adam, fp32 master copies); everything else is frozen.

Checkpoints (``state.json`` + ``state.safetensors``: factors, Adam moments, step, loss history) are written
every ``checkpoint_every`` steps; a run whose fingerprint (config, plan, calibration windows, model) matches
a checkpoint continues from its step. Batch order and PMR draws are pure functions of (seed, step), so a
resumed run retraces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from deltakit.deltallm.config import DeltaLLMConfig
from deltakit.deltallm.modules import DeltaLinear, set_replacement_
from deltakit.deltallm.plan import SharingPlan
from deltakit.distill.pmr import PMRSchedule, logit_kl

STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
CHECKPOINT_VERSION = 1

ProgressFn = Callable[[int, int, str], None]


def fingerprint(*parts: Any) -> str:
    """sha256 over JSON-able parts and tensors (bytes) — identifies a training run."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            digest.update(str((part.dtype, tuple(part.shape))).encode())
            digest.update(part.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def batch_indices(step: int, n_windows: int, batch_size: int, seed: int) -> torch.Tensor:
    """Window indices of ``step``: epoch ``step // steps_per_epoch`` is a seeded permutation (pure function)."""
    per_epoch = math.ceil(n_windows / batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return order[pos * batch_size : (pos + 1) * batch_size]


def autocast_context(device: torch.device, compute_dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def _save_checkpoint(
    path: Path, state: dict[str, Any], deltas: dict[str, DeltaLinear], optimizer: torch.optim.Optimizer
) -> None:
    """Write factors + Adam state (safetensors) and the JSON state, each via a temp file and rename."""
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in deltas.items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach().cpu().contiguous()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().cpu().contiguous()
    opt = optimizer.state_dict()
    for index, slots in opt["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{index}.{key}"] = value.detach().cpu().reshape(-1).contiguous()
    tmp = path / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path / STATE_TENSORS)
    meta = dict(state, param_groups=opt["param_groups"], version=CHECKPOINT_VERSION)
    tmp_json = path / (STATE_JSON + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_json, path / STATE_JSON)


def _load_checkpoint(
    path: Path, key: str, deltas: dict[str, DeltaLinear], optimizer: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Restore factors and Adam state in place when ``path`` holds a checkpoint of run ``key``; else None."""
    json_path, tensor_path = path / STATE_JSON, path / STATE_TENSORS
    if not (json_path.is_file() and tensor_path.is_file()):
        return None
    try:
        meta = json.loads(json_path.read_text())
    except json.JSONDecodeError:
        warnings.warn(f"ignoring damaged deltallm checkpoint {json_path}", stacklevel=3)
        return None
    if meta.get("fingerprint") != key or meta.get("version") != CHECKPOINT_VERSION:
        warnings.warn(
            f"checkpoint in {path} belongs to a different run (config, data or model differ); "
            "starting afresh",
            stacklevel=3,
        )
        return None
    tensors = load_file(str(tensor_path))
    with torch.no_grad():
        for name, module in deltas.items():
            module.lora_A.copy_(tensors[f"{name}.lora_A"])
            module.lora_B.copy_(tensors[f"{name}.lora_B"])
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name, value in tensors.items():
        if not name.startswith("opt."):
            continue
        _, index, slot = name.split(".", 2)
        i = int(index)
        shape = () if slot == "step" else params[i].shape
        opt_state.setdefault(i, {})[slot] = value.reshape(shape)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    return meta


def _probe_kl(
    model: torch.nn.Module,
    deltas: dict[str, DeltaLinear],
    plan: SharingPlan,
    probe: torch.Tensor,
    teacher_logits: torch.Tensor,
    ctx: Callable[[], contextlib.AbstractContextManager],
    temperature: float,
) -> float:
    """KL(teacher ‖ fully compressed student) on the probe windows (no grad)."""
    set_replacement_(deltas, plan, set(plan.followers))
    with torch.no_grad(), ctx():
        logits = model(probe, use_cache=False).logits
    return float(logit_kl(logits, teacher_logits, temperature))


def _split_probe(
    windows: torch.Tensor, config: DeltaLLMConfig, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(probe windows on ``device`` or None, training windows): the first ``probe_windows`` are held out."""
    if config.eval_every <= 0:
        return None, windows
    if windows.shape[0] <= config.probe_windows:
        from deltakit.errors import UsageError

        raise UsageError(
            f"eval_every needs more than probe_windows={config.probe_windows} calibration "
            f"windows, got {windows.shape[0]}; raise tokens="
        )
    return windows[: config.probe_windows].to(device), windows[config.probe_windows :]


def _hidden_mse(student: Any, teacher: Any, first: int) -> torch.Tensor:
    """Mean relative MSE of the hidden states after block ``first`` (student vs teacher)."""
    pairs = zip(student.hidden_states[first + 1 :], teacher.hidden_states[first + 1 :], strict=True)
    return torch.stack(
        [(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-8) for s, t in pairs]
    ).mean()


def _step_loss(
    model: torch.nn.Module,
    deltas: dict[str, DeltaLinear],
    plan: SharingPlan,
    batch: torch.Tensor,
    replaced: set[int],
    config: DeltaLLMConfig,
    ctx: Any,
) -> tuple[torch.Tensor, float]:
    """One distillation loss: teacher (original path) vs student with ``replaced`` followers; (loss, KL)."""
    want_hidden = config.hidden_mse > 0
    set_replacement_(deltas, plan, set())
    with torch.no_grad(), ctx():
        teacher = model(batch, use_cache=False, output_hidden_states=want_hidden)
    set_replacement_(deltas, plan, replaced)
    with ctx():
        student = model(batch, use_cache=False, output_hidden_states=want_hidden)
        loss = logit_kl(student.logits, teacher.logits, config.temperature)
        kl_value = float(loss.detach())
        if want_hidden:
            loss = loss + config.hidden_mse * _hidden_mse(student, teacher, min(replaced))
    return loss, kl_value


def _resume(
    checkpoint_dir: Path,
    run_key: str,
    deltas: dict[str, DeltaLinear],
    optimizer: torch.optim.Optimizer,
    config: DeltaLLMConfig,
    total: int,
    seq_len: int,
) -> tuple[int, dict[str, Any]]:
    """(first step, history): from the run's checkpoint when one matches ``run_key`` (factors and optimizer
    state restored in place), else a fresh start."""
    resumed = _load_checkpoint(checkpoint_dir, run_key, deltas, optimizer)
    if resumed is None:
        tokens_per_step = config.batch_size * seq_len
        return 0, {
            "steps": [],
            "probe": [],
            "total_steps": total,
            "tokens_per_step": tokens_per_step,
            "pmr": config.pmr,
        }
    start = int(resumed["step"])
    history = resumed["history"]
    history["resumed_from"] = start
    return start, history


def distill_deltas_(
    model: torch.nn.Module,
    deltas: dict[str, DeltaLinear],
    plan: SharingPlan,
    windows: torch.Tensor,
    config: DeltaLLMConfig,
    *,
    seed: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    checkpoint_dir: Path,
    run_key: str,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Train the factors of ``deltas`` (in place) by distillation from the same model's original path.

    model: a causal LM on ``device`` whose follower Linears are ``deltas`` (with ``original`` buffers), every
    other parameter frozen. windows: (n, seq_len) int64 calibration tokens. Returns the history: per-step
    ``loss``/``p``/``replaced`` and, with ``eval_every``, ``probe`` KL of the fully compressed student.
    """
    probe, windows = _split_probe(windows, config, device)
    n = windows.shape[0]
    total = config.steps or config.epochs * math.ceil(n / config.batch_size)
    schedule = PMRSchedule(start=config.pmr_start if config.pmr else 1.0, ramp=config.pmr_ramp, total=total)
    params = [p for m in deltas.values() for p in (m.lora_A, m.lora_B)]
    optimizer = torch.optim.Adam(params, lr=config.lr, foreach=False)
    followers = plan.followers

    def ctx() -> contextlib.AbstractContextManager:
        return autocast_context(device, compute_dtype)

    start, history = _resume(checkpoint_dir, run_key, deltas, optimizer, config, total, windows.shape[1])
    probe_teacher: torch.Tensor | None = None
    if probe is not None:
        set_replacement_(deltas, plan, set())
        with torch.no_grad(), ctx():
            probe_teacher = model(probe, use_cache=False).logits.float()
        if start == 0:
            kl = _probe_kl(model, deltas, plan, probe, probe_teacher, ctx, config.temperature)
            history["probe"].append({"step": 0, "kl": kl})
    began = time.time()
    for step in range(start, total):
        batch = windows[batch_indices(step, n, config.batch_size, seed)].to(device)  # (b, seq)
        mask = schedule.sample(step, len(followers), seed)
        replaced = {f for f, on in zip(followers, mask.tolist(), strict=True) if on}
        loss, kl_value = _step_loss(model, deltas, plan, batch, replaced, config, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
        optimizer.step()
        record = {"step": step + 1, "loss": float(loss.detach()), "kl": kl_value, "p": schedule.p(step)}
        history["steps"].append({**record, "replaced": len(replaced)})
        due = (step + 1) % max(config.eval_every, 1) == 0 or step + 1 == total
        if probe is not None and probe_teacher is not None and due:
            kl = _probe_kl(model, deltas, plan, probe, probe_teacher, ctx, config.temperature)
            history["probe"].append({"step": step + 1, "kl": kl})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == total:
            _save_checkpoint(
                checkpoint_dir,
                {"fingerprint": run_key, "step": step + 1, "history": history},
                deltas,
                optimizer,
            )
        if progress is not None:
            progress(
                step + 1, total, f"deltallm distil loss={float(loss.detach()):.4f} p={schedule.p(step):.2f}"
            )
    history["seconds"] = history.get("seconds", 0.0) + (time.time() - began)
    set_replacement_(deltas, plan, set(followers))
    return history
