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

from deltakit.ops.lowrank_group import KINDS, LowRankGroup, check_rows_pair
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
    if low_rank is None and signs is None:
        raise ValueError("mixed shares need a low-rank group, a sign group or both")
    check_rows_pair(x, y, "mixed shares")
    features = (x.shape[1], y.shape[1])
    if low_rank is not None and (low_rank.in_features, low_rank.out_features) != features:
        raise ValueError(
            f"low-rank group of ({low_rank.in_features} -> {low_rank.out_features}) got {features}"
        )
    if signs is not None and (signs.shape[1], signs.shape[0]) != features:
        raise ValueError(f"sign group of {signs.shape} (out, in) got (in, out) {features}")
    for group in (low_rank, signs):
        if group is not None and group.max_row >= x.shape[0]:
            raise ValueError(f"mixed share rows reach {group.max_row}, activations have {x.shape[0]}")
    lib = native_library()
    if lib is None:
        raise ValueError("the mixed-share kernel is not available")
    lr = low_rank
    code = lib.deltakit_mixed_shares(
        x.data_ptr(),
        KINDS[x.dtype],
        x.shape[0],
        x.shape[1],
        y.shape[1],
        len(lr.parts) if lr is not None else 0,
        lr.first.data_ptr() if lr is not None else None,
        lr.second.data_ptr() if lr is not None else None,
        lr.ranks.data_ptr() if lr is not None else None,
        lr.kind if lr is not None else 0,
        lr.offsets.data_ptr() if lr is not None else None,
        lr.rows.data_ptr() if lr is not None else None,
        len(signs.packed) if signs is not None else 0,
        signs.pointers.data_ptr() if signs is not None else None,
        signs.tile_pointers.data_ptr() if signs is not None else None,
        signs.offsets.data_ptr() if signs is not None else None,
        signs.rows.data_ptr() if signs is not None else None,
        signs.scales.data_ptr() if signs is not None else None,
        LUT_MIN_ROWS,
        y.data_ptr(),
        threads if threads is not None else torch.get_num_threads(),
    )
    if code != 0:
        raise ValueError(f"mixed-share kernel failed (code {code})")
