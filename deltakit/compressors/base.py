"""The model-compressor contract: shrink a model's own weights (no base), load and export the result.

A compressor writes its own files into an output directory; :mod:`deltakit.core.model_mode` adds the
``deltakit_model.json`` marker naming the compressor, and loads, exports and describes by that name.
Compressors share the config machinery of codecs (:class:`~deltakit.codecs.base.CodecConfig`) and get
calibration data through :class:`~deltakit.codecs.base.Calibration`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from deltakit.codecs.base import Calibration, CodecConfig, describe_plugin


@dataclass(frozen=True)
class ModelJob:
    """One model compression: what to compress, where to, and with which settings.

    config: the compressor's own config. reduction: fraction of parameters to remove (None: the
    compressor's config decides). calibration: where the data comes from (None when not given).
    progress: ``progress(done, total, label)`` or None.
    """

    model_dir: Path
    output: Path
    config: CodecConfig
    reduction: float | None
    calibration: Calibration | None
    device: torch.device
    seed: int
    progress: Any = None


class ModelCompressor(ABC):
    """A whole-model compressor. Register a subclass with :func:`register_compressor`."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    config_class: ClassVar[type[CodecConfig]] = CodecConfig
    summary: ClassVar[str] = ""
    needs_data: ClassVar[bool] = True

    @abstractmethod
    def compress_model(self, job: ModelJob) -> dict[str, Any]:
        """Compress ``job.model_dir`` into ``job.output`` (an existing empty directory); a JSON-able report."""

    @abstractmethod
    def load_model(self, model_dir: Path, device: torch.device | str = "cpu") -> Any:
        """Load a directory written by :meth:`compress_model` as a working transformers model."""

    @abstractmethod
    def export_model(self, model_dir: Path, output: Path, dtype: torch.dtype | None = None) -> None:
        """Materialise a :meth:`compress_model` directory as a plain checkpoint in ``output``."""

    def describe_model(self, model_dir: Path, marker: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """What ``inspect`` shows for a compressed model: a JSON-able dict and plain-text lines.

        marker: the parsed ``deltakit_model.json``; the default shows the report recorded in it.
        """
        lines = [f"{key}: {value}" for key, value in (marker.get("report") or {}).items()]
        return marker, lines

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """Name, version, summary, whether it needs data and its config fields (for ``methods``)."""
        return describe_plugin(cls)
