"""The whole ``deltallm`` run: plan, SVD init, PMR distillation, write — what the codec's compress_model calls."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from deltakit.codecs.base import Calibration
from deltakit.deltallm.config import DeltaLLMConfig
from deltakit.deltallm.io import TRAINING_FILE, write_compressed
from deltakit.deltallm.modules import count_parameters, install_deltas_
from deltakit.deltallm.plan import ModelLayout, SharingPlan, build_plan
from deltakit.deltallm.train import distill_deltas_, fingerprint
from deltakit.errors import UsageError
from deltakit.format.safetensors_io import dtype_from_name, read_header
from deltakit.models.checkpoint import CheckpointReader

CHECKPOINT_SUBDIR = "_deltallm_checkpoint"


def model_layout(reader: CheckpointReader) -> ModelLayout:
    """The block structure and parameter count of a checkpoint, from its headers (no tensor loaded)."""
    tied = bool(reader.config.get("tie_word_embeddings", False))
    return ModelLayout.from_specs(((n, reader.spec(n).shape) for n in reader.names()), tied=tied)


def plan_for(model_dir: Path | str, config: DeltaLLMConfig, reduction: float | None) -> SharingPlan:
    """The sharing plan of ``model_dir`` for ``config`` and an optional target ``reduction``."""
    reader = CheckpointReader(model_dir)
    if config.rank and reduction is not None:
        raise UsageError(
            f"give either reduction= or overrides[rank]=R, not both (got reduction={reduction}, "
            f"rank={config.rank})"
        )
    if not config.rank and reduction is None:
        raise UsageError(
            "deltallm needs a target: reduction=0.12 (rank chosen to meet it) or overrides[rank]=R"
        )
    return build_plan(
        model_layout(reader),
        layout=config.layout,
        share=config.share,
        followers_per_anchor=config.followers_per_anchor,
        keep_first=config.keep_first,
        keep_last=config.keep_last,
        rank=config.rank or None,
        reduction=reduction,
    )


def _compute_dtype(config: DeltaLLMConfig, reader: CheckpointReader) -> torch.dtype:
    if config.train_dtype != "auto":
        return dtype_from_name(config.train_dtype)
    stored = {reader.spec(n).dtype for n in reader.names()}
    return torch.bfloat16 if stored == {torch.bfloat16} else torch.float32


def _model_identity(reader: CheckpointReader) -> list[Any]:
    """Headers (names, dtypes, shapes, offsets) and sizes of the weight files: cheap and specific."""
    files = sorted({p for p in reader.path.glob("*.safetensors")})
    return [reader.config, [[f.name, f.stat().st_size, read_header(f)] for f in files]]


def compress(
    model_dir: Path,
    output: Path,
    config: DeltaLLMConfig,
    *,
    reduction: float | None,
    calibration: Calibration | None,
    device: torch.device,
    seed: int,
    progress: Any = None,
) -> dict[str, Any]:
    """Compress ``model_dir`` into ``output`` (an existing, empty directory); returns the report.

    Steps: plan → load the model (frozen) → followers become DeltaLinear(anchor weight, SVD init) → distil
    (unless ``train=false``) → write. Raises UsageError without calibration data when training.
    """
    import transformers as tf

    began = time.time()
    model_dir = Path(model_dir)
    reader = CheckpointReader(model_dir)
    plan = plan_for(model_dir, config, reduction)
    if config.train and calibration is None:
        raise UsageError(
            "deltallm distils its deltas and needs calibration text: pass data=[FILE_OR_DIR] "
            "(or overrides[train]=false for the untrained SVD initialisation)"
        )
    compute_dtype = _compute_dtype(config, reader)
    weight_dtype = compute_dtype if config.train else torch.float32
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=weight_dtype).to(device)
    model.requires_grad_(False)
    params_before = count_parameters(model)
    factor_dtype = torch.float32
    deltas = install_deltas_(
        model, plan, init="svd", keep_original=config.train, dtype=factor_dtype, seed=seed
    )
    for module in deltas.values():
        module.lora_A.requires_grad_(config.train)
        module.lora_B.requires_grad_(config.train)
    report: dict[str, Any] = {"plan": _plan_summary(plan)}
    training: dict[str, Any] | None = None
    if config.train:
        assert calibration is not None
        training = _train(
            model, deltas, plan, calibration, config, model_dir, output, reader, seed, device, compute_dtype,
            progress,
        )  # fmt: skip
    for module in deltas.values():
        module.drop_original_()
    params_after = count_parameters(model)
    store_dtype = None if config.dtype == "auto" else dtype_from_name(config.dtype)
    meta = write_compressed(
        output,
        reader,
        plan,
        deltas,
        dtype=store_dtype,
        extra={"training": training, "source": str(model_dir), "seed": seed},
    )
    report.update(
        {
            "params": meta["params"],
            "loaded_params_before": params_before,
            "loaded_params_after": params_after,
            "training": training,
            "seconds": round(time.time() - began, 1),
        }
    )
    return report


def _plan_summary(plan: Any) -> dict[str, Any]:
    """The plan as the report shows it (groups of one block left out)."""
    return {
        "layout": plan.layout,
        "share": plan.share,
        "rank": plan.rank,
        "followers": plan.followers,
        "anchors": plan.anchors,
        "groups": [g for g in plan.groups if len(g) > 1],
    }


def _train(
    model: Any,
    deltas: dict[str, Any],
    plan: Any,
    calibration: Calibration,
    config: DeltaLLMConfig,
    model_dir: Path,
    output: Path,
    reader: CheckpointReader,
    seed: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    progress: Any,
) -> dict[str, Any]:
    """Distil the deltas in place (resumable from checkpoints), write the loss curve; the training report."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    windows = calibration.batches(tokenizer)  # (n, seq_len) int64
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else output / CHECKPOINT_SUBDIR
    run_key = fingerprint(config.training_key(), plan.to_dict(), seed, _model_identity(reader), windows)
    history = distill_deltas_(
        model,
        deltas,
        plan,
        windows,
        config,
        seed=seed,
        device=device,
        compute_dtype=compute_dtype,
        checkpoint_dir=ckpt,
        run_key=run_key,
        progress=progress,
    )
    if not config.checkpoint_dir:
        shutil.rmtree(ckpt, ignore_errors=True)
    (output / TRAINING_FILE).write_text(json.dumps(history, indent=1) + "\n")
    steps = history["steps"]
    return {
        "steps": history["total_steps"],
        "tokens": history["total_steps"] * history["tokens_per_step"],
        "calibration_windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "pmr": config.pmr,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "final_probe_kl": history["probe"][-1]["kl"] if history["probe"] else None,
        "resumed_from": history.get("resumed_from"),
        "seconds": round(history.get("seconds", 0.0), 1),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "loss_curve": TRAINING_FILE,
        "losses": [round(s["loss"], 4) for s in steps],
        "probe_kl": [[p["step"], round(p["kl"], 4)] for p in history["probe"]],
    }
