"""Evaluation: perplexity, KL to the fine-tune, top-1 agreement, weight error, and ``evaluate_delta``.

Importing this package is cheap: torch is imported, transformers only when a model or tokenizer is loaded.
"""

from deltakit.eval.lm import CompareResult, Comparison, compare_models, iter_windows, perplexity, tokenize
from deltakit.eval.metrics import gain_kept, kl_closed
from deltakit.eval.models import load_model, load_tokenizer
from deltakit.eval.report import evaluate_delta, general_text, reconstruct_model
from deltakit.eval.weights import delta_relative_error, iter_tensors, relative_frobenius

__all__ = [
    "CompareResult",
    "Comparison",
    "ReferencePass",
    "compare_models",
    "compare_to",
    "delta_relative_error",
    "evaluate_delta",
    "gain_kept",
    "general_text",
    "iter_tensors",
    "iter_windows",
    "kl_closed",
    "load_model",
    "load_tokenizer",
    "perplexity",
    "reconstruct_model",
    "reference_pass",
    "relative_frobenius",
    "tokenize",
]
