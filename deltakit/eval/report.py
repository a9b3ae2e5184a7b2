"""``evaluate_delta``: everything the CLI and the benchmark report about reconstructed fine-tunes.

For each text, one pass runs the fine-tune (the reference) and compares every other model with it on the same
tokens: the base (giving KL(ft‖base), the distance a delta must close) and each reconstruction. Weight-space
error is measured against the true delta. The result is a plain JSON-ready dict (schema below).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import FormatError, TensorMismatchError, UsageError
from deltakit.eval.lm import Comparison, compare_to, reference_pass, tokenize
from deltakit.eval.metrics import gain_kept, kl_closed
from deltakit.eval.models import is_checkpoint_dir, is_delta_dir, load_model, load_tokenizer
from deltakit.eval.weights import delta_relative_error

CandidateSource = str | os.PathLike | torch.nn.Module
"""A reconstruction: checkpoint dir, delta dir (rebuilt on the base), or module."""
Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages ``<model>:<text>`` (windows done) and ``<model>:weights``, where
model is ``finetune``, ``base`` or a candidate name."""

SCHEMA_VERSION = 1


def general_text() -> str:
    """General text for base retention (``pydoc_data.topics``, same text the fleet records use)."""
    from deltakit.zoo.corpora import general_text as _general

    return _general()


def _names_for(candidates: Mapping[str, object] | Sequence[object]) -> dict[str, object]:
    if isinstance(candidates, Mapping):
        named = dict(candidates)
    else:
        named = {}
        for i, c in enumerate(candidates):
            name = Path(c).name if isinstance(c, (str, os.PathLike)) else f"recon{i}"
            while name in named or name in ("base", "finetune"):
                name = f"{name}_{i}"
            named[name] = c
    reserved = {"base", "finetune"} & set(named)
    if reserved:
        raise UsageError(f"candidate names {sorted(reserved)} are reserved; rename them")
    return named


def reconstruct_model(base_dir: str | os.PathLike[str], delta_dir: str | os.PathLike[str]) -> torch.nn.Module:
    """base + delta as an fp32 module, rebuilt in memory (no files written) by :func:`deltakit.apply`."""
    from deltakit.core.apply import apply

    state = apply(base_dir, delta_dir).state_dict
    model = load_model(base_dir)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise TensorMismatchError(
            f"reconstruction of {delta_dir}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def _load_candidate(source, base_dir: Path) -> torch.nn.Module:
    if isinstance(source, torch.nn.Module):
        return source.eval()
    path = Path(source)
    if is_checkpoint_dir(path):
        return load_model(path)
    if is_delta_dir(path):
        return reconstruct_model(base_dir, path)
    raise FormatError(f"{path} is neither a checkpoint dir (config.json) nor a delta dir (manifest.json)")


def default_texts(finetune_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The held-out text named in a fleet variant's ``zoo.json``, as ``{"heldout:<domain>": text}``."""
    import json

    rec_path = Path(finetune_dir) / "zoo.json"
    if not rec_path.is_file():
        raise UsageError(f"{finetune_dir} has no zoo.json naming its held-out text; pass the text explicitly")
    rec = json.loads(rec_path.read_text(encoding="utf-8"))
    path = Path(rec["heldout_path"])
    if not path.is_file():
        raise FormatError(f"held-out text {path} named in {rec_path} is missing")
    return {f"heldout:{rec.get('domain', 'domain')}": path.read_text(encoding="utf-8")}


def _finite(x: float) -> float | None:
    """JSON has no NaN/inf: undefined ratios become null."""
    return x if math.isfinite(x) else None


def evaluate_delta(
    base_dir: str | os.PathLike[str],
    finetune_dir: str | os.PathLike[str],
    candidates: Mapping[str, CandidateSource] | Sequence[CandidateSource],
    texts: Mapping[str, str] | None = None,
    *,
    general: bool | str = True,
    window: int = 256,
    stride: int | None = None,
    max_tokens: int | None = 4096,
    weights: bool = True,
    progress: Progress | None = None,
) -> dict:
    """Measure how well each candidate reproduces the fine-tune.

    Args:
        base_dir, finetune_dir: HF checkpoint dirs (same architecture and tokenizer).
        candidates: reconstructions, as checkpoint dirs, delta dirs (rebuilt on ``base_dir``) or modules;
            a sequence is named after the dirs' basenames.
        texts: ``{name: text}`` of the fine-tune's domain; default: the held-out text in the fine-tune's
            ``zoo.json``.
        general: base-retention text; ``True`` = ``pydoc_data.topics``, a string = that text, ``False`` = none.
        window, stride, max_tokens: strided-window settings (see :func:`deltakit.eval.lm.iter_windows`);
            each text is cut to its first ``max_tokens`` tokens.
        weights: also compute weight-space error against the true delta (streams the checkpoints).

    Returns a dict: ``{"schema": 1, "base", "finetune", "candidates": [names], "settings": {...},
    "texts": {text: {"kind": "domain"|"general", "tokens", "ppl_base", "ppl_finetune", "kl_ft_base",
    "top1_base", "candidates": {name: {"ppl", "kl", "kl_closed", "top1", "gain_kept"}}}},
    "weights": {name: {"overall", "unchanged_tensors", "per_tensor": {tensor: err}}}}``. KL is nats/token;
    undefined ratios (a fine-tune identical to the base) are null.

    Memory: one model at a time (fp32) plus the fine-tune's log-probs on every text (tokens × vocab × 4
    bytes each: 0.8 GB for 4096 tokens of SmolLM2), whatever the number of candidates. Time: one forward
    pass over each text per model.
    """
    rep = progress or (lambda *a: None)
    base_dir, finetune_dir = Path(base_dir), Path(finetune_dir)
    named = _names_for(candidates)
    if not named:
        raise UsageError("give at least one reconstruction to evaluate")
    texts = dict(texts) if texts is not None else default_texts(finetune_dir)
    kinds = dict.fromkeys(texts, "domain")
    if general:
        gname = "general:pydoc_data.topics" if general is True else "general"
        texts[gname] = general_text() if general is True else str(general)
        kinds[gname] = "general"

    # 1) the fine-tune runs once per text; its log-probs are kept (≈ tokens × vocab × 4 bytes per text)
    refs = _reference_passes(finetune_dir, texts, window, stride, max_tokens, rep)
    # 2) then one model at a time: the base, then each reconstruction (memory: one model + the references)
    comps: dict[str, dict[str, Comparison]] = {}
    weight_errs: dict[str, dict] = {}
    for name, src in [("base", base_dir), *named.items()]:
        model = load_model(base_dir) if name == "base" else _load_candidate(src, base_dir)
        comps[name] = {t: compare_to(ref, model, _cb(rep, f"{name}:{t}")) for t, ref in refs.items()}
        if weights and name != "base":
            rep(f"{name}:weights", 0, 1)
            weight_errs[name] = _weight_error(src, model, finetune_dir, base_dir)
            rep(f"{name}:weights", 1, 1)
        del model

    out: dict = {
        "schema": SCHEMA_VERSION,
        "base": str(base_dir),
        "finetune": str(finetune_dir),
        "candidates": list(named),
        "settings": {"window": window, "stride": stride if stride else window - 1, "max_tokens": max_tokens},
        "texts": {},
    }
    for tname, ref in refs.items():
        out["texts"][tname] = _text_entry(kinds[tname], ref, {n: c[tname] for n, c in comps.items()}, named)
    if weights:
        out["weights"] = weight_errs
    return out


def _reference_passes(
    finetune_dir: Path,
    texts: dict[str, str],
    window: int,
    stride: int | None,
    max_tokens: int | None,
    rep: Progress,
) -> dict[str, Any]:
    """The fine-tune's pass over every text (its log-probs kept for the comparisons); the model is freed."""
    tokenizer = load_tokenizer(finetune_dir)
    finetune = load_model(finetune_dir)
    return {
        t: reference_pass(
            finetune, tokenize(tokenizer, text, max_tokens), window, stride, _cb(rep, f"finetune:{t}")
        )
        for t, text in texts.items()
    }


def _weight_error(src: CandidateSource, model: torch.nn.Module, finetune_dir: Path, base_dir: Path) -> dict:
    """Weight-space error of a candidate against the true delta (non-finite values as None)."""
    recon = src if isinstance(src, (str, os.PathLike)) and is_checkpoint_dir(src) else model.state_dict()
    err = delta_relative_error(recon, finetune_dir, base_dir)
    err["overall"] = _finite(err["overall"])
    err["per_tensor"] = {k: _finite(v) for k, v in err["per_tensor"].items()}
    return err


def _text_entry(kind: str, ref: Any, comps: dict[str, Comparison], named: Mapping[str, Any]) -> dict:
    """One text's row of the report: the base's and the fine-tune's figures, then each candidate's."""
    b = comps["base"]
    entry: dict[str, Any] = {
        "kind": kind,
        "tokens": ref.tokens,
        "ppl_base": b.ppl,
        "ppl_finetune": ref.ppl,
        "kl_ft_base": b.kl,
        "top1_base": b.top1,
        "candidates": {},
    }
    for name in named:
        c = comps[name]
        entry["candidates"][name] = {
            "ppl": c.ppl,
            "kl": c.kl,
            "kl_closed": _finite(kl_closed(c.kl, b.kl)),
            "top1": c.top1,
            "gain_kept": _finite(gain_kept(b.ppl, c.ppl, ref.ppl)),
        }
    return entry


def _cb(rep: Progress, stage: str) -> Callable[[int, int], None]:
    return lambda done, total: rep(stage, done, total)
