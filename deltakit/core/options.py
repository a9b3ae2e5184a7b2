"""The options of :func:`deltakit.compress` and :func:`deltakit.compress_model`, as one dataclass.

The CLI maps its flags onto these fields once (see ``deltakit_cli.core_cmds``); Python callers pass an
object or the same names as keywords.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltakit.codecs.base import Calibration, CodecConfig
from deltakit.errors import UsageError

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class CompressOptions:
    """How to compress. Sizes: ``ratio`` (fraction of the fp16 delta), ``rank``, ``bits_per_weight`` (coded
    bits per weight of the encoded matrices) or ``size`` (bytes of the whole delta's stored tensors), at
    most one; ``allocation`` spreads a size target across tensors (``uniform``: one ratio everywhere;
    ``rd``: rate–distortion, see :mod:`deltakit.core.allocation`; None: ``rd`` for ``size`` and
    ``bits_per_weight`` when the codec offers candidates, else ``uniform``). ``reduction`` (fraction of
    parameters to remove) is for model compression only."""

    method: str = "dqrelo"
    ratio: float | None = None
    rank: int | None = None
    bits_per_weight: float | None = None
    size: int | None = None
    allocation: str | None = None
    reduction: float | None = None
    config: CodecConfig | dict[str, Any] | None = None
    overrides: dict[str, str] | None = None
    device: str | torch.device = "cpu"
    seed: int = 0
    #: calibration text (files, directories, JSONL) and its token budget, for data-aware methods, scale
    #: refinement and ``weight_allocation``
    data: tuple[str | Path, ...] | list[str | Path] | None = None
    #: None: up to 65 536 tokens, or all of a shorter text (at least 16 windows); a number is a demand
    tokens: int | None = None
    seq_len: int = 256
    base_name: str | None = None
    target_name: str | None = None
    #: matrix roles (``embedding``, ``lm_head``, ``linear``, ``other``) stored exactly instead of encoded
    exclude_roles: tuple[str, ...] = ()
    #: fit each sign part's per-matrix scale on ``data`` against the fine-tune's logits after encoding
    #: (:mod:`deltakit.core.refine`). Halving steps or windows per step lowered KL closed on shakespeare at
    #: 0.5 bits/weight (docs/rate_distortion/scale_refinement/README.md). The learning rate (relative to
    #: each scale): 0.02 / 0.05 / 0.1 / 0.2 gave 0.9913 / 0.9930 / 0.9937 / 0.9917 KL closed on
    #: shakespeare at 0.5 bits/weight; None picks 0.1 or 0.05 from the number of multipliers per matrix
    #: (:func:`deltakit.core.refine.default_lr`, measured on the whole fleet)
    refine_scales: bool = False
    #: weight each matrix's error in the ``rd`` allocation by its layer's input energy on ``data``
    #: (:mod:`deltakit.core.activations`). Off by default: on the fleet it lowered deltacome's KL closed at
    #: 1 bit/weight (milton 0.9948 -> 0.9839, jargon 0.9940 -> 0.9794; docs/rate_distortion/README.md)
    weight_allocation: bool = False
    refine_steps: int = 20
    refine_lr: float | None = None
    refine_batch: int = 4
    overwrite: bool = False
    max_shard_bytes: int = 1 << 30
    progress: Progress | None = field(default=None, compare=False)

    @classmethod
    def build(cls, options: CompressOptions | None = None, **changes: Any) -> CompressOptions:
        """``options`` (default: all defaults) with the given fields replaced; unknown names are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise UsageError(
                f"unknown compress option(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(options or cls(), **changes)

    def size_target(self) -> bool:
        """Whether the bytes are planned across tensors (a size, bits per weight, or ``allocation="rd"``);
        refuses conflicting or malformed sizes."""
        given = [k for k in ("ratio", "rank", "bits_per_weight", "size") if getattr(self, k) is not None]
        if len(given) > 1 and not set(given) <= {"ratio", "rank"}:  # ratio with rank: Budget refuses it
            raise UsageError(
                f"give one size ({', '.join(given)} were given): ratio, rank, bits_per_weight or size"
            )
        if self.allocation not in (None, "uniform", "rd"):
            raise UsageError(f"allocation={self.allocation!r} is not valid; choose uniform or rd")
        if self.size is not None and (
            not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1
        ):
            raise UsageError(f"size must be a positive number of bytes, got {self.size!r}")
        bpw = self.bits_per_weight
        if bpw is not None and (
            isinstance(bpw, bool) or not isinstance(bpw, int | float) or not 0 < bpw <= 16
        ):
            raise UsageError(f"bits_per_weight must lie in (0, 16], got {bpw!r}")
        if self.rank is not None and self.allocation == "rd":
            raise UsageError("allocation='rd' plans bytes; give ratio=, bits_per_weight= or size=, not rank=")
        return (
            self.size is not None or bpw is not None or (self.allocation == "rd" and self.ratio is not None)
        )

    def calibration(self, needs_data: bool) -> Calibration | None:
        """The calibration a data-aware method runs on; refuses a missing ``data``."""
        if not needs_data:
            return None
        return self._calibration(f"method {self.method!r} needs calibration data")

    def allocation_weighting(self, mode: str) -> Calibration | None:
        """The calibration the ``rd`` allocation is weighted on (``weight_allocation=True``), else None;
        refuses a missing ``data`` and an allocation other than ``rd``."""
        if not self.weight_allocation:
            return None
        if mode != "rd":
            raise UsageError(f"weight_allocation=True weights the rd allocation; allocation is {mode!r}")
        return self._calibration("weight_allocation=True weighs matrices on calibration data")

    def scale_refinement(self) -> Calibration | None:
        """The calibration scale refinement runs on (``refine_scales=True``), else None; refuses a missing
        ``data``."""
        if not self.refine_scales:
            return None
        return self._calibration("refine_scales=True fits scales on calibration data")

    def _calibration(self, needed_by: str) -> Calibration:
        """``data`` with the token budget, window length and seed; a UsageError starting with
        ``needed_by`` when no data was given."""
        if not self.data:
            raise UsageError(f"{needed_by}: pass data=[FILE_OR_DIR] (text or JSONL)")
        return Calibration(
            tuple(str(d) for d in self.data), tokens=self.tokens, seq_len=self.seq_len, seed=self.seed
        )


def build_config(
    codec: Any, config: CodecConfig | dict[str, Any] | None, overrides: dict[str, str] | None
) -> CodecConfig:
    """The codec's config from defaults, a dict or config object, then ``key=value`` string overrides."""
    if config is None:
        cfg = codec.config_class()
    elif isinstance(config, CodecConfig):
        if not isinstance(config, codec.config_class):
            raise UsageError(f"config {type(config).__name__} does not belong to codec {codec.name}")
        cfg = config
    else:
        cfg = codec.config_class.from_dict(dict(config))
    cfg.validate()
    return cfg.with_overrides(overrides) if overrides else cfg
