"""Calibration windows: an explicit token budget is a demand, the default takes what a short text has."""

from __future__ import annotations

import pytest
import torch

from deltakit.distill.data import DEFAULT_TOKENS, MIN_DEFAULT_WINDOWS, token_batches
from deltakit.errors import UsageError


def _encode(text: str) -> list[int]:
    return [int(w) for w in text.split()]


def _texts(n_tokens: int) -> list[str]:
    return [" ".join(str(i % 1000) for i in range(n_tokens))]


def test_explicit_budget_gives_that_many_windows_or_refuses():
    windows = token_batches(_texts(4000), _encode, seq_len=32, tokens=640, seed=0)
    assert windows.shape == (20, 32) and windows.dtype == torch.int64
    with pytest.raises(UsageError, match="lower tokens="):
        token_batches(_texts(1000), _encode, seq_len=32, tokens=4096)


def test_default_budget_is_capped_at_the_default_tokens():
    windows = token_batches(_texts(4 * DEFAULT_TOKENS), _encode, seq_len=256, tokens=None)
    assert windows.shape == (DEFAULT_TOKENS // 256, 256)


def test_default_budget_takes_every_window_of_a_short_text():
    n = 40 * 64 + 17  # 40 whole windows and a partial one
    windows = token_batches(_texts(n), _encode, seq_len=64, tokens=None)
    assert windows.shape == (40, 64)
    # every window once, in stream order
    assert torch.equal(windows.flatten(), torch.tensor(_encode(_texts(n)[0])[: 40 * 64]))


def test_default_budget_refuses_below_the_minimum_and_names_the_need():
    n = (MIN_DEFAULT_WINDOWS - 1) * 64
    with pytest.raises(UsageError, match=f"{MIN_DEFAULT_WINDOWS * 64} needed"):
        token_batches(_texts(n), _encode, seq_len=64, tokens=None)
    assert token_batches(_texts(n + 64), _encode, seq_len=64, tokens=None).shape == (MIN_DEFAULT_WINDOWS, 64)


def test_nonpositive_budget_is_refused():
    with pytest.raises(UsageError, match="tokens must be >= 1"):
        token_batches(_texts(1000), _encode, seq_len=32, tokens=0)


def test_choice_is_seeded():
    texts = _texts(20 * 32)
    a = token_batches(texts, _encode, seq_len=32, tokens=10 * 32, seed=1)
    assert torch.equal(a, token_batches(texts, _encode, seq_len=32, tokens=10 * 32, seed=1))
    assert not torch.equal(a, token_batches(texts, _encode, seq_len=32, tokens=10 * 32, seed=2))
