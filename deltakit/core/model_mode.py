"""Compressing a model's own weights (no base): the entry points shared by ``lillama`` and ``deltallm``.

A compressed model is a directory holding the codec's own files plus ``deltakit_model.json``, which
names the codec that wrote it; loading and exporting dispatch on that name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deltakit._version import __version__
from deltakit.codecs.base import Calibration, CodecConfig
from deltakit.codecs.registry import get_codec
from deltakit.errors import FormatError, UsageError
from deltakit.format.atomic import atomic_directory

MODEL_MARKER = "deltakit_model.json"
MODEL_FORMAT = "deltakit.model"
MODEL_FORMAT_VERSION = 1


def compress_model(
    model_dir: str | Path,
    output: str | Path,
    *,
    method: str,
    reduction: float | None,
    calibration: Calibration | None,
    config: CodecConfig | dict | None = None,
    overrides: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    overwrite: bool = False,
    progress: Any = None,
) -> dict[str, Any]:
    """Compress ``model_dir`` with ``method`` into ``output`` (atomic); returns the codec's report."""
    from deltakit.core.compress import build_config
    from deltakit.core.device import resolve_device

    codec = get_codec(method)
    if "model" not in codec.modes:
        raise UsageError(f"{method} compresses deltas only; give --base BASE_DIR")
    if reduction is not None and not (0.0 < reduction < 1.0):
        raise UsageError(f"--reduction must be in (0, 1), got {reduction}")
    cfg = build_config(codec, config, overrides)
    dev = resolve_device(device)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        report = codec.compress_model(
            Path(model_dir),
            tmp,
            cfg,
            reduction=reduction,
            calibration=calibration,
            device=dev,
            seed=seed,
            progress=progress,
        )
        marker = {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "deltakit_version": __version__,
            "codec": {"name": codec.name, "version": codec.version, "config": cfg.to_dict()},
            "source": str(model_dir),
            "reduction": reduction,
            "calibration": None
            if calibration is None
            else {
                "sources": list(calibration.sources),
                "tokens": calibration.tokens,
                "seq_len": calibration.seq_len,
                "seed": calibration.seed,
            },
            "report": report,
        }
        (tmp / MODEL_MARKER).write_text(json.dumps(marker, indent=1, default=str) + "\n")
    return report


def read_marker(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_MARKER
    if not path.is_file():
        raise FormatError(f"{model_dir} is not a deltakit compressed model (no {MODEL_MARKER})")
    marker = json.loads(path.read_text())
    if marker.get("format") != MODEL_FORMAT:
        raise FormatError(f"{path}: not a deltakit compressed model")
    if marker.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {marker['format_version']} is newer than this deltakit reads"
        )
    return marker


def is_compressed_model(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MODEL_MARKER).is_file()


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> Any:
    """A working transformers model from a compressed-model directory."""
    marker = read_marker(model_dir)
    return get_codec(marker["codec"]["name"]).load_model(Path(model_dir), device)


def export_model(
    model_dir: str | Path, output: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Materialise a compressed-model directory as a plain Hugging Face checkpoint (atomic)."""
    marker = read_marker(model_dir)
    codec = get_codec(marker["codec"]["name"])
    with atomic_directory(output, overwrite=overwrite) as tmp:
        codec.export_model(Path(model_dir), tmp, dtype)
    return Path(output)
