"""A batched decoding loop with per-row sampling parameters, stop strings and streaming callbacks.

Prompts are left-padded into one batch; positions come from the attention mask, so a row's tokens
see the same positions as when it runs alone. Every forward pass runs the whole batch (static
batching): a finished row keeps a slot until the batch ends.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from deltakit.errors import NonFiniteError
from deltakit.runtime.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """One prompt to continue.

    on_text: called with each new piece of text (streaming); if it raises, the row stops ("cancelled").
    cancel: set it (from any thread) to stop the row at the next token ("cancelled", e.g. the client left).
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # set once on_text received text


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    #: why the row stopped with finish_reason "error" (its logits were not finite: NonFiniteError); the
    #: other rows of its batch go on
    error: Exception | None = field(default=None, repr=False, compare=False)


@dataclass
class _RowState:
    request: GenerationRequest
    sampler: Sampler
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish: str | None = None
    error: Exception | None = None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not yet safe to stream (a partial stop string, a broken byte)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


class Detokenizer:
    """Turns token ids into text and applies stop strings; one per generation."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def update(self, row: _RowState, final: bool = False) -> None:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        stops = row.request.params.stop
        cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
        if cut >= 0:
            text, row.finish = text[:cut], "stop"
        row.text = text
        safe = len(text) if (final or row.finish) else len(text) - _held_back(text, stops)
        if row.request.on_text is not None and safe > row.emitted:
            try:
                row.request.on_text(text[row.emitted : safe])
                row.request.streamed = True
            except Exception:  # the consumer is gone: stop this row only
                log.info("streaming callback failed; row cancelled", exc_info=True)
                row.finish = "cancelled"
            row.emitted = safe


def eos_ids(model, tokenizer) -> set[int]:
    """Token ids that end a sequence (model config and tokenizer)."""
    ids: set[int] = set()
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        model.config.eos_token_id,
        tokenizer.eos_token_id,
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Decode every request in one batch on the model's device; returns results in request order.

    The model is only read. Each row stops at EOS, at a stop string or after ``max_tokens``.
    """
    device = next(model.parameters()).device
    rows = [_RowState(r, Sampler(r.params)) for r in requests]
    detok = Detokenizer(tokenizer)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    width = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((len(requests), width), pad, dtype=torch.long)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        if not r.prompt_ids:
            raise ValueError("empty prompt")
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)  # (batch, seq)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    steps = max(r.params.max_tokens for r in requests)
    for step in range(steps):
        logits = out.logits[:, -1, :].float().cpu()  # (batch, vocab)
        next_ids = []
        for i, row in enumerate(rows):
            if row.finish is None and row.request.cancel.is_set():
                row.finish = "cancelled"
            if row.finish is None:
                try:
                    token = row.sampler.choose(logits[i])
                except NonFiniteError as exc:  # this row's delta overflows; its batch-mates go on
                    row.finish, row.error = "error", exc
                    next_ids.append(pad)
                    continue
                if token in eos:
                    row.finish = "stop"
                else:
                    row.tokens.append(token)
                    detok.update(row)
                    if row.finish is None and len(row.tokens) >= row.request.params.max_tokens:
                        row.finish = "length"
                next_ids.append(token)
            else:
                next_ids.append(pad)
        if all(row.finish is not None for row in rows) or step == steps - 1:
            break
        step_ids = torch.tensor(next_ids, device=device).unsqueeze(1)  # (batch, 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
            logits_to_keep=1,
        )
    results = []
    for row in rows:
        detok.update(row, final=True)
        results.append(
            GenerationResult(
                row.tokens,
                row.text,
                row.finish or "length",
                len(row.request.prompt_ids),
                len(row.tokens),
                row.error,
            )
        )
    return results
