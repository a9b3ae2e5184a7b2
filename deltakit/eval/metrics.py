"""Scalar summaries of what a reconstructed delta keeps (see docs/methods.md, "Measuring what a delta keeps")."""

from __future__ import annotations

import math


def kl_closed(kl_ft_recon: float, kl_ft_base: float) -> float:
    """Share of the base→fine-tune distance the reconstruction closes: ``1 − KL(ft‖recon) / KL(ft‖base)``.

    1 means the reconstruction matches the fine-tune, 0 means it is no closer than the base, negative means
    it is further away than the base. NaN when the fine-tune equals the base (``KL(ft‖base) == 0``).
    """
    if kl_ft_base <= 0.0:
        return math.nan
    return 1.0 - kl_ft_recon / kl_ft_base


def gain_kept(ppl_base: float, ppl_recon: float, ppl_ft: float) -> float:
    """Perplexity gain kept: ``(ppl_base − ppl_recon) / (ppl_base − ppl_ft)``.

    1 for an exact reconstruction, 0 for no gain. It can exceed 1 (a reconstruction that overshoots the
    fine-tune in the same direction): report it beside KL, never instead of it. NaN when the fine-tune has
    no perplexity gain.
    """
    denom = ppl_base - ppl_ft
    if denom == 0.0:
        return math.nan
    return (ppl_base - ppl_recon) / denom
