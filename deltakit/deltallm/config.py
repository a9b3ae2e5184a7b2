"""The ``deltallm`` compressor's config: structure, distillation (PMR) and checkpointing knobs."""

from __future__ import annotations

from dataclasses import dataclass

from deltakit.codecs.base import CodecConfig, config_field
from deltakit.deltallm.plan import LAYOUTS, SHARES
from deltakit.errors import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAIN_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class DeltaLLMConfig(CodecConfig):
    """Every field can be set with ``--set key=value``; the rank comes from ``--reduction`` unless given."""

    layout: str = config_field(
        "alternating",
        "which blocks share: sequential (one anchor, then "
        "followers_per_anchor followers) or alternating (anchor, follower, ...)",
        LAYOUTS,
    )
    followers_per_anchor: int = config_field(2, "followers per anchor in the sequential layout")
    share: str = config_field("mlp", "which matrices a follower shares with its anchor", SHARES)
    keep_first: int = config_field(2, "leading blocks kept intact")
    keep_last: int = config_field(2, "trailing blocks kept intact")
    rank: int = config_field(0, "rank of every low-rank delta A@B (0: the largest rank meeting --reduction)")
    train: bool = config_field(True, "distil the deltas from the original model (false: SVD init only)")
    pmr: bool = config_field(
        True, "Progressive Module Replacement (false: plain distillation, p=1 throughout)"
    )
    pmr_start: float = config_field(0.5, "PMR replacement probability at step 0")
    pmr_ramp: float = config_field(0.7, "fraction of the run over which the PMR probability reaches 1")
    steps: int = config_field(0, "optimiser steps (0: epochs passes over the calibration windows)")
    epochs: int = config_field(1, "passes over the calibration windows when steps=0")
    batch_size: int = config_field(4, "calibration windows per optimiser step")
    lr: float = config_field(3e-4, "Adam learning rate of the delta factors")
    temperature: float = config_field(1.0, "softmax temperature of the logit KL")
    hidden_mse: float = config_field(0.0, "weight of the hidden-state MSE term (0: logits KL only)")
    train_dtype: str = config_field(
        "auto",
        "compute dtype while training (auto: bfloat16 autocast for "
        "bf16 checkpoints, else float32); factors stay float32",
        TRAIN_DTYPES,
    )
    dtype: str = config_field("auto", "dtype of the stored factors (auto: the checkpoint's)", DTYPES)
    eval_every: int = config_field(
        0,
        "every N steps, measure the fully compressed student's KL on probe_windows held-out windows (0: off)",
    )
    probe_windows: int = config_field(2, "calibration windows held out for eval_every")
    checkpoint_dir: str | None = config_field(
        None,
        "where to keep the training checkpoint (resumed when it "
        "matches); default: inside the output's temp area",
    )
    checkpoint_every: int = config_field(25, "save a checkpoint every N steps")

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.followers_per_anchor >= 1, "followers_per_anchor must be >= 1"),
            (self.keep_first >= 0 and self.keep_last >= 0, "keep_first/keep_last must be >= 0"),
            (self.rank >= 0, "rank must be >= 0"),
            (0.0 <= self.pmr_start <= 1.0, "pmr_start must be in [0, 1]"),
            (0.0 < self.pmr_ramp <= 1.0, "pmr_ramp must be in (0, 1]"),
            (self.steps >= 0 and self.epochs >= 1, "steps must be >= 0 and epochs >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0 and self.temperature > 0, "lr and temperature must be > 0"),
            (self.hidden_mse >= 0, "hidden_mse must be >= 0"),
            (self.eval_every >= 0 and self.probe_windows >= 1, "eval_every >= 0 and probe_windows >= 1"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def training_key(self) -> dict:
        """The fields that change the training result (checkpoint location and cadence excluded)."""
        d = self.to_dict()
        for key in ("checkpoint_dir", "checkpoint_every", "dtype"):
            d.pop(key)
        return d
