"""``deltallm``: weights shared between neighbouring decoder blocks plus low-rank deltas, trained with PMR.

Followers use ``W_anchor + A B``; the A, B factors start from the truncated SVD of
``W_follower − W_anchor`` and are distilled from the original model with Progressive Module
Replacement. The work lives in :mod:`deltakit.deltallm`; this file adapts it to the compressor contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltakit.compressors.base import ModelCompressor, ModelJob
from deltakit.compressors.hf_config import seal
from deltakit.compressors.registry import register_compressor
from deltakit.deltallm.config import DeltaLLMConfig


@register_compressor
class DeltaLLM(ModelCompressor):
    name = "deltallm"
    version = 1
    config_class = DeltaLLMConfig
    summary = "share weights between neighbouring blocks + low-rank deltas distilled with PMR (whole model)"
    needs_data = True

    def compress_model(self, job: ModelJob) -> dict[str, Any]:
        from deltakit.deltallm.compress import compress
        from deltakit.deltallm.io import remote_code_plan, write_weight_index

        assert isinstance(job.config, DeltaLLMConfig)
        report = compress(
            job.model_dir,
            job.output,
            job.config,
            reduction=job.reduction,
            calibration=job.calibration,
            device=job.device,
            seed=job.seed,
            progress=job.progress,
        )
        write_weight_index(Path(job.output))
        seal(Path(job.output), self.name, remote_code_plan(Path(job.output)))
        return report

    def load_model(self, model_dir: Path, device: torch.device | str = "cpu") -> Any:
        from deltakit.deltallm.io import load_compressed

        return load_compressed(model_dir, device)

    def describe_model(self, model_dir: Path, marker: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        from deltakit.deltallm.io import describe_model, format_description

        description = describe_model(model_dir)
        return description, format_description(description)

    def export_model(self, model_dir: Path, output: Path, dtype: torch.dtype | None = None) -> None:
        from deltakit.deltallm.io import export_plain

        export_plain(model_dir, output, dtype)
