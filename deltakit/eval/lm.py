"""Language-model measures on text: perplexity, KL to a reference model, top-1 agreement.

All measures use the same strided windows (the Hugging Face "perplexity of fixed-length models" scheme):
windows of ``window`` tokens start every ``stride`` tokens; each window scores only the tokens that no
earlier window scored, with the rest of the window as left context. With ``stride == window`` the windows
are disjoint; with ``window >= len(ids)`` one window scores every token but the first.

Token ids are a 1-D ``torch.long`` tensor. Models are causal LMs (``model(input_ids).logits`` of shape
``(batch, seq, vocab)``); they are run in eval mode under ``torch.inference_mode`` and never mutated.
Logits are cast to float32 before any log-softmax, whatever the model's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(done, total)`` with counts of windows."""


@dataclass(frozen=True)
class Window:
    """One evaluation window: tokens ``ids[begin:end]`` are fed, the last ``n_scored`` targets are scored."""

    begin: int
    end: int
    n_scored: int


def iter_windows(n_tokens: int, window: int = 256, stride: int | None = None) -> Iterator[Window]:
    """Yield strided windows over ``n_tokens`` tokens; no token is scored twice, each has >= 1 token of context.

    Window k feeds ``ids[begin:end]`` with ``end = min(n, window + k·stride)`` and ``begin = max(0, end − window)``
    and scores the targets after the previous window's end. ``stride`` defaults to ``window − 1``, the cheapest
    setting that scores every token but the first; ``stride == window`` leaves the first token of each window
    as context only (as in the Hugging Face recipe). Requires ``1 <= stride <= window``.
    """
    stride = window - 1 if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"need window >= 2 and 1 <= stride <= window, got window={window} stride={stride}")
    prev_end = 1  # token 0 has no context, so it is never a target
    k = 0
    while prev_end < n_tokens:
        end = min(n_tokens, window + k * stride)
        begin = max(0, end - window)
        first = max(prev_end, begin + 1)  # the first input token is context only
        if end > first:
            yield Window(begin, end, end - first)
        prev_end = max(prev_end, end)
        k += 1


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens added), truncated to ``max_tokens``: 1-D long tensor, CPU."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # a parameterless module: run on CPU
        return torch.device("cpu")


@torch.inference_mode()
def window_logprobs(model: torch.nn.Module, ids: torch.Tensor, win: Window) -> torch.Tensor:
    """Log-probabilities predicting the ``win.n_scored`` scored targets: ``(n_scored, vocab)`` float32, CPU."""
    model.eval()
    inp = ids[win.begin : win.end].unsqueeze(0).to(_device_of(model))
    logits = model(input_ids=inp).logits[0]  # (seq, vocab)
    # position t predicts token t+1: the scored targets ids[end-n:end] come from logits[-n-1:-1]
    logits = logits[-win.n_scored - 1 : -1].float()
    return F.log_softmax(logits, dim=-1).cpu()


def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int = 256,
    stride: int | None = None,
    progress: ProgressFn | None = None,
) -> float:
    """Perplexity ``exp(mean NLL)`` of ``model`` on the 1-D token ids ``ids`` with strided windows."""
    nll, count = 0.0, 0
    wins = list(iter_windows(len(ids), window, stride))
    for i, win in enumerate(wins):
        logp = window_logprobs(model, ids, win)
        targets = ids[win.end - win.n_scored : win.end]
        nll += -logp.gather(1, targets.unsqueeze(1)).sum().item()
        count += win.n_scored
        if progress is not None:
            progress(i + 1, len(wins))
    if count == 0:
        raise ValueError("need at least 2 tokens to measure perplexity")
    return math.exp(nll / count)


@dataclass
class Comparison:
    """Per-token averages for one candidate model against the reference, over the same scored tokens.

    ``kl`` is KL(reference ‖ candidate) in nats per token; ``top1`` is the share of positions where both
    models' argmax agree; ``ppl`` is the candidate's own perplexity on the text.
    """

    kl: float
    top1: float
    ppl: float


@dataclass
class CompareResult:
    """The reference's perplexity, the number of scored tokens, and one :class:`Comparison` per candidate."""

    tokens: int
    reference_ppl: float
    candidates: dict[str, Comparison] = field(default_factory=dict)


@dataclass
class ReferencePass:
    """The reference model's log-probabilities on every window of one text, kept for comparisons.

    ``logprobs[i]`` is ``(windows[i].n_scored, vocab)`` float32 on CPU: about ``tokens × vocab × 4`` bytes
    in all (0.8 GB for 4096 tokens of a 49k vocabulary).
    """

    ids: torch.Tensor
    windows: list[Window]
    logprobs: list[torch.Tensor]
    ppl: float

    @property
    def tokens(self) -> int:
        return sum(w.n_scored for w in self.windows)


def reference_pass(
    reference: torch.nn.Module,
    ids: torch.Tensor,
    window: int = 256,
    stride: int | None = None,
    progress: ProgressFn | None = None,
) -> ReferencePass:
    """Run the reference (the fine-tune) once over ``ids`` and keep its log-probs for :func:`compare_to`."""
    wins = list(iter_windows(len(ids), window, stride))
    if not wins:
        raise ValueError("need at least 2 tokens to compare models")
    logprobs, nll = [], 0.0
    for i, win in enumerate(wins):
        lp = window_logprobs(reference, ids, win)
        targets = ids[win.end - win.n_scored : win.end].unsqueeze(1)
        nll += -lp.gather(1, targets).sum().item()
        logprobs.append(lp)
        if progress is not None:
            progress(i + 1, len(wins))
    count = sum(w.n_scored for w in wins)
    return ReferencePass(ids=ids, windows=wins, logprobs=logprobs, ppl=math.exp(nll / count))


def compare_to(ref: ReferencePass, model: torch.nn.Module, progress: ProgressFn | None = None) -> Comparison:
    """KL(reference ‖ model) and top-1 agreement per token, and the model's perplexity, on ``ref``'s tokens."""
    kl = agree = nll = 0.0
    for i, (win, ref_lp) in enumerate(zip(ref.windows, ref.logprobs, strict=True)):
        targets = ref.ids[win.end - win.n_scored : win.end].unsqueeze(1)
        cand = window_logprobs(model, ref.ids, win)
        kl += (ref_lp.exp() * (ref_lp - cand)).sum().item()  # Σ over positions of KL(ref ‖ cand)
        agree += (cand.argmax(-1) == ref_lp.argmax(-1)).sum().item()
        nll += -cand.gather(1, targets).sum().item()
        if progress is not None:
            progress(i + 1, len(ref.windows))
    n = ref.tokens
    # KL is >= 0 mathematically; float round-off on identical models can give -1e-9: clamp it
    return Comparison(kl=max(kl / n, 0.0), top1=agree / n, ppl=math.exp(nll / n))


def compare_models(
    reference: torch.nn.Module,
    candidates: Mapping[str, torch.nn.Module],
    ids: torch.Tensor,
    window: int = 256,
    stride: int | None = None,
    progress: ProgressFn | None = None,
) -> CompareResult:
    """KL(reference ‖ candidate), top-1 agreement and perplexities of every candidate on ``ids``.

    The reference runs once (:func:`reference_pass`); each candidate is then compared on the same tokens.
    """
    ref = reference_pass(reference, ids, window, stride, progress)
    out = CompareResult(tokens=ref.tokens, reference_ppl=ref.ppl)
    for name, model in candidates.items():
        out.candidates[name] = compare_to(ref, model)
    return out
