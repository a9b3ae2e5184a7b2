"""Compressing a model's own weights (no base) with a registered model compressor (lillama, deltallm).

A compressed model is a directory holding the compressor's own files plus ``deltakit_model.json``, which
names the compressor that wrote it; loading, exporting and describing dispatch on that name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from deltakit._version import __version__
from deltakit.codecs.base import Calibration, CodecConfig
from deltakit.codecs.registry import list_codecs
from deltakit.compressors.base import ModelCompressor, ModelJob
from deltakit.compressors.registry import get_compressor, list_compressors
from deltakit.core.device import resolve_device
from deltakit.core.options import CompressOptions, build_config
from deltakit.errors import FormatError, UsageError
from deltakit.format.atomic import atomic_directory
from deltakit.format.manifest import check_header, read_json

MODEL_MARKER = "deltakit_model.json"
MODEL_FORMAT = "deltakit.model"
MODEL_FORMAT_VERSION = 1


def compress_model(
    model: str | Path, output: str | Path, *, options: CompressOptions | None = None, **changes: Any
) -> dict[str, Any]:
    """Shrink ``model``'s own weights with compressor ``method`` into ``output`` (atomic).

    options / keywords: as for :func:`deltakit.compress` (``method``, ``reduction``, ``data``, ``tokens``,
    ``seq_len``, ``config``, ``overrides``, ``device``, ``seed``, ``overwrite``, ``progress``).
    Returns the compressor's JSON-able report.
    """
    opts = CompressOptions.build(options, **changes)
    compressor = _compressor(opts.method)
    calibration = opts.calibration(compressor.needs_data)
    if opts.reduction is not None and not (0.0 < opts.reduction < 1.0):
        raise UsageError(f"reduction must be in (0, 1), got {opts.reduction}")
    cfg = build_config(compressor, opts.config, opts.overrides)
    dev = resolve_device(opts.device)
    with atomic_directory(output, overwrite=opts.overwrite) as tmp:
        job = ModelJob(Path(model), tmp, cfg, opts.reduction, calibration, dev, opts.seed, opts.progress)
        report = compressor.compress_model(job)
        marker = _marker(compressor, cfg, model, opts.reduction, calibration, report)
        (tmp / MODEL_MARKER).write_text(json.dumps(marker, indent=1, default=str) + "\n")
    return report


def _compressor(method: str) -> ModelCompressor:
    """The compressor named ``method``; a delta-only codec name says to give a base."""
    if method not in list_compressors() and method in list_codecs():
        raise UsageError(f"{method} compresses deltas only; pass base=BASE_DIR to deltakit.compress")
    return get_compressor(method)


def _marker(
    compressor: ModelCompressor,
    cfg: CodecConfig,
    model: str | Path,
    reduction: float | None,
    calibration: Calibration | None,
    report: dict[str, Any],
) -> dict[str, Any]:
    """The ``deltakit_model.json`` content: who wrote the directory, from what, with which settings."""
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "deltakit_version": __version__,
        "codec": {"name": compressor.name, "version": compressor.version, "config": cfg.to_dict()},
        "source": str(model),
        "reduction": reduction,
        "calibration": None if calibration is None else dataclasses.asdict(calibration),
        "report": report,
    }


def read_marker(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``deltakit_model.json`` of a compressed-model directory (format and version checked)."""
    path = Path(model_dir) / MODEL_MARKER
    data = read_json(path, f"{model_dir} is not a deltakit compressed model (no {MODEL_MARKER})")
    marker = check_header(data, str(path), MODEL_FORMAT, MODEL_FORMAT_VERSION, "deltakit compressed model")
    codec = marker.get("codec")
    if not isinstance(codec, dict) or not isinstance(codec.get("name"), str):
        raise FormatError(f"{path}: codec.name must be a string")
    return marker


def is_compressed_model(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MODEL_MARKER).is_file()


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> Any:
    """A working transformers model from a compressed-model directory."""
    marker = read_marker(model_dir)
    return get_compressor(marker["codec"]["name"]).load_model(Path(model_dir), device)


def export_model(
    model_dir: str | Path, output: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Materialise a compressed-model directory as a plain Hugging Face checkpoint (atomic)."""
    marker = read_marker(model_dir)
    compressor = get_compressor(marker["codec"]["name"])
    with atomic_directory(output, overwrite=overwrite) as tmp:
        compressor.export_model(Path(model_dir), tmp, dtype)
    return Path(output)


def describe_model(model_dir: str | Path) -> tuple[str, dict[str, Any], list[str]]:
    """What ``inspect`` shows for a compressed model: compressor name, a JSON-able dict, text lines."""
    marker = read_marker(model_dir)
    compressor = get_compressor(marker["codec"]["name"])
    description, lines = compressor.describe_model(Path(model_dir), marker)
    return compressor.name, description, lines
