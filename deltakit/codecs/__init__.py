"""Delta codecs: the interface (:mod:`.base`) and the registry (:mod:`.registry`)."""

from deltakit.codecs.base import Budget, Codec, CodecConfig, EncodeContext, Encoded, config_field
from deltakit.codecs.registry import get_codec, list_codecs, register_codec

__all__ = [
    "Budget",
    "Codec",
    "CodecConfig",
    "Encoded",
    "EncodeContext",
    "config_field",
    "get_codec",
    "list_codecs",
    "register_codec",
]
