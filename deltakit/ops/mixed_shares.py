"""A mixed batch's sign and low-rank shares added into a layer's output in one compiled call.

For a linear layer whose delta shares are a :class:`~deltakit.ops.signmm.SignGroup` and/or a
:class:`~deltakit.ops.lowrank_group.LowRankGroup` (dqrelo and bitdelta deltas, mixed with svd ones or
not), the executor would widen the activations to fp32, allocate an fp32 share, call each group into it
and add it to the output: torch operations whose per-call cost was about 0.2 s of a 3 s decode of
SmolLM2 with 4 dqrelo deltas x 2 rows (docs/speed.md). ``deltakit_mixed_shares`` (``lowrank_native.c``)
does the same operations in the same order in one call, so the output has the same bits. CPU only, and
only with the compiled library.
"""

from __future__ import annotations

import torch

from deltakit.ops.lowrank_group import KINDS, LowRankGroup, check_rows_pair, trusted_rows
from deltakit.ops.signmm import LUT_MIN_ROWS, SignGroup, native_library


def add_shares_into(
    x: torch.Tensor,
    y: torch.Tensor,
    low_rank: LowRankGroup | None,
    signs: SignGroup | None,
    threads: int | None = None,
) -> None:
    """``y.add_(share)`` with ``share`` the fp32 sum of ``low_rank``'s and then ``signs``' shares of
    ``x.float()``, as the two groups' ``add_into`` on a zero share would give; y mutated, every row (a row
    of no part adds +0, as ``add_`` does). x (N, in) and y (N, out): contiguous CPU tensors of one dtype of
    :data:`~deltakit.ops.lowrank_group.KINDS`. At least one group; both of the layer's (in, out).
    threads: default torch's intra-op count (the bits do not depend on it)."""
    SharesCall(low_rank, signs).add_into(x, y, threads)


class SharesCall:
    """One layer's groups for :func:`add_shares_into`, with the call's fixed arguments laid out once (a
    mixed batch makes one per layer and tokens per row, and calls it about 210 times per decoded token on
    SmolLM2). The groups are kept: their addresses go to the kernel."""

    def __init__(self, low_rank: LowRankGroup | None, signs: SignGroup | None):
        if low_rank is None and signs is None:
            raise ValueError("mixed shares need a low-rank group, a sign group or both")
        self.low_rank, self.signs = low_rank, signs
        if low_rank is not None:
            self.in_features, self.out_features = low_rank.in_features, low_rank.out_features
        else:
            self.out_features, self.in_features = signs.shape
        if signs is not None and tuple(signs.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"sign group of {tuple(signs.shape)} (out, in) and low-rank group of "
                f"({self.out_features}, {self.in_features}) in one layer"
            )
        self.max_row = max(g.max_row for g in (low_rank, signs) if g is not None)
        self._low_rank_args = low_rank.parts_args if low_rank is not None else (0, *[None] * 6)
        self._sign_args = signs.parts_args if signs is not None else (0, *[None] * 5)
        self._lib = native_library()

    def add_into(self, x: torch.Tensor, y: torch.Tensor, threads: int | None = None) -> None:
        """:func:`add_shares_into` with this call's groups; every argument checked."""
        check_rows_pair(x, y, "mixed shares")
        features = (x.shape[1], y.shape[1])
        if (self.in_features, self.out_features) != features:  # the groups share them (checked when made)
            if self.low_rank is not None:
                raise ValueError(
                    f"low-rank group of ({self.in_features} -> {self.out_features}) got {features}"
                )
            raise ValueError(f"sign group of {self.signs.shape} (out, in) got (in, out) {features}")
        if self.max_row >= x.shape[0]:
            raise ValueError(f"mixed share rows reach {self.max_row}, activations have {x.shape[0]}")
        self._call(x, y, x.shape[0], threads)

    def add_into_trusted(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """:meth:`add_into` for a caller that has checked x (..., in) and y (..., out) to be contiguous CPU
        tensors of one dtype of :data:`~deltakit.ops.lowrank_group.KINDS` whose leading dimensions hold
        the groups' rows (a mixed batch's executor, for the groups it made for that batch): only the
        feature sizes and the row count are checked again (:func:`~deltakit.ops.lowrank_group.trusted_rows`)."""
        features = (self.in_features, self.out_features)
        self._call(x, y, trusted_rows(x, y, features, self.max_row, "mixed shares"), None)

    def _call(self, x: torch.Tensor, y: torch.Tensor, rows: int, threads: int | None) -> None:
        """The kernel on ``rows`` rows of x (rows, in) and y (rows, out), both contiguous."""
        if self._lib is None:
            raise ValueError("the mixed-share kernel is not available")
        code = self._lib.deltakit_mixed_shares(
            x.data_ptr(),
            KINDS[x.dtype],
            rows,
            self.in_features,
            self.out_features,
            *self._low_rank_args,
            *self._sign_args,
            LUT_MIN_ROWS,
            y.data_ptr(),
            threads if threads is not None else torch.get_num_threads(),
        )
        if code != 0:
            raise ValueError(f"mixed-share kernel failed (code {code})")
