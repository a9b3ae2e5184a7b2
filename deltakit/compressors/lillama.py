"""Lillama as a whole-model compressor: chosen Linears become ``up(down(x))`` and are distilled block by block.

Chosen Linears of a model become two Linears ``up(down(x))`` initialised from the SVD of W (√S on each
side) at ranks allocated to remove ``reduction`` of the parameters, then each decoder block is distilled
against the original block (see :mod:`deltakit.lillama.distill`). The output directory loads with
:func:`deltakit.load_model` and exports to a plain checkpoint with :func:`deltakit.export_model`. The
delta codec of the same name is :mod:`deltakit.codecs.lillama`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltakit.codecs.lillama import LillamaConfig, require_calibration
from deltakit.compressors.base import ModelCompressor, ModelJob
from deltakit.compressors.hf_config import seal
from deltakit.compressors.registry import register_compressor
from deltakit.errors import UsageError


@register_compressor
class LillamaModel(ModelCompressor):
    name = "lillama"
    version = 1
    config_class = LillamaConfig
    summary = "SVD-initialised low-rank Linears refined by block-local feature distillation (needs data)"
    needs_data = True

    def compress_model(self, job: ModelJob) -> dict[str, Any]:
        from deltakit.lillama.model import compress_model_dir, load_tokenizer, remote_code_plan

        if job.reduction is None:
            raise UsageError(
                "lillama model compression needs reduction= (the fraction of parameters to remove, e.g. 0.2)"
            )
        config: LillamaConfig = job.config  # type: ignore[assignment]
        calibration = require_calibration(job.calibration)
        windows = calibration.batches(load_tokenizer(Path(job.model_dir)))  # (n, seq) int64
        report = compress_model_dir(
            Path(job.model_dir),
            Path(job.output),
            reduction=job.reduction,
            windows=windows,
            settings=config.settings(job.seed),
            strategy=config.strategy,
            rank_step=config.rank_step,
            min_rank_ratio=config.min_rank_ratio,
            skip_first=config.skip_first,
            modules=config.modules,
            distill=config.distill,
            svd_kwargs=config.svd_kwargs(),
            device=job.device,
            progress=job.progress,
        )
        seal(Path(job.output), self.name, remote_code_plan(Path(job.output)))
        return report

    def load_model(self, model_dir: Path, device: torch.device | str = "cpu") -> Any:
        from deltakit.lillama.model import load_compressed

        return load_compressed(Path(model_dir), device)

    def export_model(self, model_dir: Path, output: Path, dtype: torch.dtype | None = None) -> None:
        from deltakit.lillama.model import export_dense

        export_dense(Path(model_dir), Path(output), dtype)
