"""Calibration data for the data-aware codecs: text files, directories or JSONL -> token batches.

Every data-aware codec (``lillama``, ``deltallm``, BitDelta's scale distillation...) draws its
batches here, so the same ``--data``/``--tokens``/``--seed`` mean the same thing everywhere.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from deltakit.errors import UsageError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst", "")
JSON_TEXT_KEYS = ("text", "content", "prompt", "completion")


def _read_jsonl(path: Path) -> Iterable[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if isinstance(record, str):
                yield record
                continue
            parts = [
                record[k]
                for k in JSON_TEXT_KEYS
                if isinstance(record, dict) and isinstance(record.get(k), str)
            ]
            if not parts:
                raise UsageError(
                    f"{path}:{number}: no text field (expected one of {', '.join(JSON_TEXT_KEYS)})"
                )
            yield "\n".join(parts)


def read_texts(sources: Iterable[str | Path]) -> list[str]:
    """Documents from text files, ``.jsonl`` files (one record per line) or directories of them.

    Directories are walked in sorted order so the result is deterministic.
    """
    docs: list[str] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise UsageError(f"calibration data {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".jsonl":
                docs.extend(_read_jsonl(file))
            elif file.suffix in TEXT_SUFFIXES or not path.is_dir():
                docs.append(file.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UsageError("calibration data holds no text")
    return docs


#: calibration tokens asked for when ``tokens`` is not given
DEFAULT_TOKENS = 65536
#: without an explicit ``tokens``, a text shorter than DEFAULT_TOKENS is used whole from this many windows on
MIN_DEFAULT_WINDOWS = 16


def token_batches(
    texts: list[str],
    encode: Callable[[str], list[int]],
    *,
    seq_len: int,
    tokens: int | None,
    seed: int = 0,
) -> torch.Tensor:
    """Cut the tokenised documents into ``tokens // seq_len`` windows of ``seq_len`` tokens.

    encode: the tokenizer's text -> ids function. Documents are joined into one stream (in order),
    cut into non-overlapping windows, and a seeded random choice of windows is returned as an int64
    tensor of shape (windows, seq_len). ``tokens=None`` asks for :data:`DEFAULT_TOKENS` but takes every
    window a shorter text has, down to :data:`MIN_DEFAULT_WINDOWS`; an explicit ``tokens`` is a demand.
    Raises UsageError naming the fix when the text is too short.
    """
    if seq_len < 2:
        raise UsageError(f"sequence length must be >= 2, got {seq_len}")
    if tokens is not None and tokens < 1:
        raise UsageError(f"tokens must be >= 1, got {tokens}")
    wanted = max(1, (DEFAULT_TOKENS if tokens is None else tokens) // seq_len)
    stream: list[int] = []
    for text in texts:
        stream.extend(encode(text))
        if len(stream) >= 4 * wanted * seq_len:  # enough to sample from; keeps huge corpora cheap
            break
    available = len(stream) // seq_len
    if tokens is None and available < wanted:
        minimum = min(wanted, MIN_DEFAULT_WINDOWS)
        if available < minimum:
            raise UsageError(
                f"calibration data has {len(stream)} tokens, fewer than the {minimum * seq_len} needed "
                f"({minimum} windows of {seq_len}); give more text in data=[FILE_OR_DIR]"
            )
        wanted = available
    if available < wanted:
        raise UsageError(
            f"calibration data has {len(stream)} tokens, fewer than the {wanted * seq_len} requested "
            f"({wanted} windows of {seq_len}); give more text in data=[FILE_OR_DIR] or lower tokens="
        )
    windows = torch.tensor(stream[: available * seq_len], dtype=torch.int64).view(available, seq_len)
    order = list(range(available))
    random.Random(seed).shuffle(order)
    return windows[sorted(order[:wanted])]


def calibration_batches(
    sources: Iterable[str | Path], tokenizer, *, seq_len: int = 256, tokens: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Token windows (windows, seq_len) int64 from ``sources`` with a Hugging Face ``tokenizer``
    (``tokens``: as :func:`token_batches`)."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return token_batches(read_texts(sources), encode, seq_len=seq_len, tokens=tokens, seed=seed)


def iter_minibatches(windows: torch.Tensor, batch_size: int, *, seed: int = 0, epochs: int = 1):
    """Yield (batch, seq_len) slices of ``windows`` in a seeded order, ``epochs`` times."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(windows.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            yield windows[order[start : start + batch_size]]


def load_tokenizer(*paths: Path, needed_for: str) -> Any:
    """The tokenizer saved in the first of ``paths`` that has one; a one-line UsageError naming
    ``needed_for`` (what wanted it, e.g. ``"lillama"``) and why each path failed when none has."""
    from transformers import AutoTokenizer

    errors = []
    for path in paths:
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:  # noqa: BLE001 - try the next directory, report all below
            lines = str(exc).strip().splitlines()
            errors.append(f"{path}: {lines[0][:120] if lines else type(exc).__name__}")
    raise UsageError(
        f"{needed_for} needs a tokenizer saved with the model for its calibration data; " + "; ".join(errors)
    )
