"""The real fleet ("zoo"): SmolLM2-135M-Instruct as base plus fine-tuned variants on distinct text domains.

Everything is built locally from package registries (PyPI, Debian), cached under ``<cache>/zoo``
(``DELTAKIT_CACHE`` overrides the cache root). Heavy modules (transformers, gguf) load only when used.
"""

from deltakit.zoo.base import ensure_base, locate_base_gguf
from deltakit.zoo.corpora import DOMAINS, Split, domain_split, general_text, get_domain, split_documents
from deltakit.zoo.fleet import (
    DEFAULT_STEPS,
    DEFAULT_VARIANTS,
    build_fleet,
    build_variant,
    list_fleet,
    variant_path,
)
from deltakit.zoo.gguf_convert import convert_gguf, read_gguf_tensors
from deltakit.zoo.paths import cache_dir, zoo_dir
from deltakit.zoo.train import Recipe, finetune

__all__ = [
    "DEFAULT_STEPS",
    "DEFAULT_VARIANTS",
    "DOMAINS",
    "Recipe",
    "Split",
    "build_fleet",
    "build_variant",
    "cache_dir",
    "convert_gguf",
    "domain_split",
    "ensure_base",
    "finetune",
    "general_text",
    "get_domain",
    "list_fleet",
    "locate_base_gguf",
    "read_gguf_tensors",
    "split_documents",
    "variant_path",
    "zoo_dir",
]
