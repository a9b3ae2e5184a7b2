"""deltakit: one base model, many small compressed fine-tune deltas.

The public API is re-exported here and imported lazily, so ``import deltakit`` does not load torch
until something is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deltakit._version import __version__

_EXPORTS = {
    "compress": "deltakit.core.compress",
    "apply": "deltakit.core.apply",
    "ApplyReport": "deltakit.core.apply",
    "verify": "deltakit.core.verify",
    "CompressOptions": "deltakit.core.options",
    "compress_model": "deltakit.core.model_mode",
    "Decoder": "deltakit.core.decode",
    "load_delta": "deltakit.core.decode",
    "Delta": "deltakit.format.delta",
    "Manifest": "deltakit.format.manifest",
    "TensorEntry": "deltakit.format.manifest",
    "FactoredView": "deltakit.codecs.base",
    "StoredTensor": "deltakit.codecs.base",
    "ModelCompressor": "deltakit.compressors.base",
    "ModelJob": "deltakit.compressors.base",
    "get_compressor": "deltakit.compressors.registry",
    "list_compressors": "deltakit.compressors.registry",
    "register_compressor": "deltakit.compressors.registry",
    "get_codec": "deltakit.codecs.registry",
    "list_codecs": "deltakit.codecs.registry",
    "register_codec": "deltakit.codecs.registry",
    "Codec": "deltakit.codecs.base",
    "CodecConfig": "deltakit.codecs.base",
    "Budget": "deltakit.codecs.base",
    "Encoded": "deltakit.codecs.base",
    "EncodeContext": "deltakit.codecs.base",
    "config_field": "deltakit.codecs.base",
    "checkpoint_fingerprint": "deltakit.format.fingerprint",
    "Registry": "deltakit.registry",
    "load_model": "deltakit.core.model_mode",
    "export_model": "deltakit.core.model_mode",
    "Calibration": "deltakit.codecs.base",
    "set_threads": "deltakit.ops.threads",
    "available_cpus": "deltakit.ops.threads",
}

__all__ = [
    "__version__",
    "set_threads",
    "available_cpus",
    "compress",
    "compress_model",
    "CompressOptions",
    "Decoder",
    "TensorEntry",
    "FactoredView",
    "StoredTensor",
    "ModelCompressor",
    "ModelJob",
    "get_compressor",
    "list_compressors",
    "register_compressor",
    "apply",
    "ApplyReport",
    "verify",
    "load_delta",
    "Delta",
    "Manifest",
    "get_codec",
    "list_codecs",
    "register_codec",
    "Codec",
    "CodecConfig",
    "Budget",
    "Encoded",
    "EncodeContext",
    "config_field",
    "checkpoint_fingerprint",
    "Registry",
    "load_model",
    "export_model",
    "Calibration",
]

if TYPE_CHECKING:
    from deltakit.codecs.base import (
        Budget,
        Calibration,
        Codec,
        CodecConfig,
        EncodeContext,
        Encoded,
        FactoredView,
        StoredTensor,
        config_field,
    )
    from deltakit.codecs.registry import get_codec, list_codecs, register_codec
    from deltakit.compressors.base import ModelCompressor, ModelJob
    from deltakit.compressors.registry import get_compressor, list_compressors, register_compressor
    from deltakit.core.apply import ApplyReport, apply
    from deltakit.core.compress import compress
    from deltakit.core.decode import Decoder, load_delta
    from deltakit.core.model_mode import compress_model, export_model, load_model
    from deltakit.core.options import CompressOptions
    from deltakit.core.verify import verify
    from deltakit.format.delta import Delta
    from deltakit.format.fingerprint import checkpoint_fingerprint
    from deltakit.format.manifest import Manifest, TensorEntry


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
