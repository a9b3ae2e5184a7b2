"""Support code of ``lillama``: low-rank Linears, rank allocation, block-local distillation.

See :mod:`deltakit.codecs.lillama` for the delta codec, :mod:`deltakit.compressors.lillama` for the
model compressor, and ``docs/lillama.md`` for usage and measurements.
"""

from deltakit.lillama.distill import DistillSettings, feature_loss
from deltakit.lillama.lowrank import DeltaLinear, LowRankLinear, svd_factors
from deltakit.lillama.ranks import LinearSpec, allocate_ranks, candidate_ranks

__all__ = [
    "DeltaLinear",
    "DistillSettings",
    "LinearSpec",
    "LowRankLinear",
    "allocate_ranks",
    "candidate_ranks",
    "feature_loss",
    "svd_factors",
]
