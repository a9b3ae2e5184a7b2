"""DeltaLLM: neighbouring decoder blocks share weights; followers add low-rank deltas distilled with PMR.

Public pieces: :func:`build_plan` / :class:`SharingPlan` (structure), :class:`DeltaLinear` (real sharing),
:func:`describe_model` (for ``deltakit inspect``), :func:`load_compressed` / :func:`export_plain`, and the
baselines in :mod:`deltakit.deltallm.baselines`. The model compressor is
``deltakit.compressors.deltallm`` (``--method deltallm`` without ``--base``).
"""

from deltakit.deltallm.config import DeltaLLMConfig
from deltakit.deltallm.io import describe_model, export_plain, format_description, load_compressed
from deltakit.deltallm.modules import DeltaLinear, LowRankLinear, count_parameters, install_deltas_
from deltakit.deltallm.plan import ModelLayout, SharingPlan, build_plan

__all__ = [
    "DeltaLLMConfig",
    "DeltaLinear",
    "LowRankLinear",
    "ModelLayout",
    "SharingPlan",
    "build_plan",
    "count_parameters",
    "describe_model",
    "export_plain",
    "format_description",
    "install_deltas_",
    "load_compressed",
]
