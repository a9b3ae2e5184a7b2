"""Lillama: SVD-initialised low-rank weights refined by local (block-by-block) feature distillation.

Sy, Cerisara & Illina, "Large Language Models Compression via Low-Rank Feature Distillation"
(arXiv 2412.16719). This file is the delta codec; the whole-model compressor of the same name lives in
:mod:`deltakit.compressors.lillama` and shares :class:`LillamaConfig`.

- delta mode (``base``): each block Linear's delta Δ = W_ft − W_base starts from its truncated SVD at the
  rank the ratio gives (as in ``svd``) and the factors are distilled so that the block with
  ``W_base + up·down`` matches the fine-tuned block. :meth:`Lillama.prepare` does the distillation and
  returns the factors; encode then hands them out from ``ctx.prepared`` (other matrices, e.g. embeddings, get plain truncated SVD).
  Storage, rank for the budget, decode (up @ down in fp32) and the factored view are ``svd``'s, through
  :func:`deltakit.codecs._common.store_factors` / ``load_factors``: with ``factor_bits`` < 16 the distilled
  fp32 factors are quantized after distillation (groups of ``factor_group``, ``factor_rounding``; the
  ``refit`` rounding re-fits ``down`` against the distilled product ``up·down``, not against Δ, so the
  distillation's correction is what the quantized pair approximates), and the rank is the largest whose
  exact quantized bytes fit the budget. The delta applies through the generic apply.

``factor_bits`` defaults to 16 (float factors in ``factor_dtype``) here, unlike ``svd``/``dqrelo`` where
the fleet measurement chose 4 (docs/codecs.md, "Defaults"): lillama's factors are trained in floating
point against the fine-tune's activations and quantizing them afterwards was not measured on the fleet,
so the data-aware default stays the one its distillation was evaluated with. 8, 4, 3 and 2 bits are
supported (``factor_bits=4``). Deltas written before the field existed hold float factors
(:attr:`LillamaConfig.STORED_DEFAULTS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from deltakit.codecs._common import FACTOR_BITS, FACTOR_DTYPES, load_factors, require_2d, store_factors
from deltakit.codecs.base import (
    Budget,
    Calibration,
    Codec,
    CodecConfig,
    EncodeContext,
    Encoded,
    FactoredView,
    StoredTensor,
    config_field,
)
from deltakit.codecs.registry import register_codec
from deltakit.codecs.svd import SVD, SVDConfig
from deltakit.errors import ConfigError, TensorMismatchError, UsageError
from deltakit.lillama.blocks import MODULE_CHOICES
from deltakit.lillama.distill import LOSS_CHOICES, DistillSettings
from deltakit.lillama.ranks import STRATEGIES


@dataclass(frozen=True)
class LillamaConfig(CodecConfig):
    STORED_DEFAULTS: ClassVar[dict[str, Any]] = {"factor_bits": 16}

    strategy: str = config_field(
        "bottom",
        "rank allocation (model mode): compress lower blocks first, upper blocks first, or all blocks alike",
        choices=STRATEGIES,
    )
    modules: str = config_field("all", "which block Linears to factorise/distil", choices=MODULE_CHOICES)
    rank_step: int = config_field(32, "candidate ranks are multiples of this (model mode)")
    min_rank_ratio: float = config_field(
        0.25, "smallest candidate rank as a fraction of min(out, in) (model mode)"
    )
    skip_first: int = config_field(0, "leave the first N blocks uncompressed (model mode)")
    lr: float = config_field(
        1e-3, "AdamW learning rate (paper: 8.6e-5 with ~13M tokens; few CPU tokens need more)"
    )
    batch_size: int = config_field(8, "calibration windows per optimizer step")
    epochs: int = config_field(1, "passes over the calibration windows per block")
    loss: str = config_field(
        "joint",
        "inputs of the student block: teacher's and previous student's (joint), "
        "teacher's only, or student's only",
        choices=LOSS_CHOICES,
    )
    weight_decay: float = config_field(0.0, "AdamW weight decay")
    eval_windows: int = config_field(
        8, "windows on which the block loss is reported before/after distillation"
    )
    distill: bool = config_field(True, "distil after the SVD init (false: the truncated-SVD baseline)")
    svd_method: str = config_field("randomized", "truncated SVD algorithm", choices=("randomized", "exact"))
    oversample: int = config_field(10, "extra random directions for the randomized SVD")
    power_iters: int = config_field(4, "power iterations for the randomized SVD")
    factor_dtype: str = config_field(
        "float16", "dtype of the stored delta factors when factor_bits=16 (delta mode)", choices=FACTOR_DTYPES
    )
    factor_bits: int = config_field(
        16,
        "bits per stored delta factor value (delta mode): 16 = float factors in factor_dtype; "
        "8/4/3/2 = quantized after distillation (not measured on the fleet yet, so not the default)",
        FACTOR_BITS,
    )
    factor_group: int = config_field(64, "values per fp16 scale when factor_bits < 16 (delta mode)")
    factor_rounding: str = config_field(
        "refit",
        "quantized delta factors: rtn, or refit (round up, least-squares re-fit down to the distilled "
        "product)",
        ("rtn", "refit"),
    )

    def validate(self) -> None:
        super().validate()
        for key in ("rank_step", "batch_size", "epochs", "eval_windows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_rank_ratio < 1.0:
            raise ConfigError(f"min_rank_ratio must be in [0, 1), got {self.min_rank_ratio}")
        if self.skip_first < 0:
            raise ConfigError(f"skip_first must be >= 0, got {self.skip_first}")
        self.svd_config().validate()

    def settings(self, seed: int) -> DistillSettings:
        return DistillSettings(
            lr=self.lr,
            batch_size=self.batch_size,
            epochs=self.epochs,
            loss=self.loss,
            weight_decay=self.weight_decay,
            eval_windows=self.eval_windows,
            seed=seed,
        )

    def svd_kwargs(self) -> dict[str, Any]:
        return {"method": self.svd_method, "oversample": self.oversample, "power_iters": self.power_iters}

    def svd_config(self) -> SVDConfig:
        return SVDConfig(
            svd_method=self.svd_method,
            oversample=self.oversample,
            power_iters=self.power_iters,
            factor_dtype=self.factor_dtype,
            factor_bits=self.factor_bits,
            factor_group=self.factor_group,
            factor_rounding=self.factor_rounding,
        )


def require_calibration(calibration: Calibration | None) -> Calibration:
    if calibration is None:
        raise UsageError("lillama needs calibration data: pass data=[FILE_OR_DIR] (text or JSONL)")
    return calibration


@dataclass(frozen=True)
class LillamaPrepared:
    """What :meth:`Lillama.prepare` distilled: per tensor name, fp32 factors up (out, r) and down (r, in)
    on the CPU (:meth:`Lillama.encode` stores them as the config says), and the distillation report."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    report: dict[str, Any]


@register_codec
class Lillama(Codec):
    name = "lillama"
    version = 1
    config_class = LillamaConfig
    summary = "SVD-initialised low-rank weights refined by block-local feature distillation (needs data)"
    default_ratio = 1 / 8
    needs_data = True

    def prepare(
        self,
        base: Any,
        target: Any,
        config: LillamaConfig,
        budget: Budget,
        calibration: Calibration | None,
        device: torch.device,
        seed: int,
        progress: Any = None,
    ) -> LillamaPrepared:
        """Distil every changed block Linear's factors; :meth:`encode` reads them from ``ctx.prepared``.

        base, target: checkpoint-directory sources (``.path``); in-memory tensors cannot be run as models.
        """
        from deltakit.lillama.delta import distill_delta
        from deltakit.lillama.model import load_tokenizer

        calibration = require_calibration(calibration)
        base_dir, target_dir = getattr(base, "path", None), getattr(target, "path", None)
        if base_dir is None or target_dir is None:
            raise UsageError(
                "lillama runs the models to distil: give base and fine-tune as checkpoint directories"
            )
        windows = calibration.batches(load_tokenizer(Path(target_dir), Path(base_dir)))  # (n, seq) int64
        svd = SVD()
        svd_config = config.svd_config()

        def rank_for(name: str, shape: tuple[int, int]) -> int:
            return svd.rank_for(
                shape, EncodeContext(budget=budget, device=device, seed=seed, name=name), svd_config
            )

        def seed_for(name: str) -> int:
            return EncodeContext(budget=budget, seed=seed, name=name).tensor_seed()

        factors, report = distill_delta(
            Path(base_dir),
            Path(target_dir),
            windows=windows,
            settings=config.settings(seed),
            modules=config.modules,
            rank_for=rank_for,
            seed_for=seed_for,
            svd_kwargs=config.svd_kwargs(),
            device=device,
            progress=progress,
        )
        known = set(target.names())
        unknown = sorted(set(factors) - known)
        if unknown:
            raise TensorMismatchError(
                f"lillama: model parameter names {unknown[:3]} are not tensors of {target_dir}; "
                "this architecture renames weights on load and is not supported in delta mode"
            )
        refined = {
            k: (u.to(torch.float32).contiguous(), d.to(torch.float32).contiguous())
            for k, (u, d) in factors.items()
        }
        return LillamaPrepared(refined, report)

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: LillamaConfig, ctx: EncodeContext
    ) -> Encoded:
        shape = require_2d(ctx.name, self.name, tuple(target.shape))
        refined = ctx.prepared.factors.get(ctx.name) if isinstance(ctx.prepared, LillamaPrepared) else None
        if refined is not None and tuple(refined[0].shape[:1]) + tuple(refined[1].shape[1:]) == shape:
            up, down = refined  # (out, r), (r, in) fp32
            tensors, params = store_factors(up, down, config.svd_config())
            return Encoded(tensors, {"shape": list(shape), "rank": int(up.shape[1]), **params})
        return SVD().encode(base, target, config.svd_config(), ctx)

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        up, down = load_factors(encoded, device)  # fp32 (out, r), (r, in)
        return up @ down

    def stored_tensors(
        self, shape: tuple[int, ...], dtype: torch.dtype, config: LillamaConfig, budget: Budget
    ) -> dict[str, StoredTensor]:
        return SVD().stored_tensors(shape, dtype, config.svd_config(), budget)

    def factored(self, encoded: Encoded) -> FactoredView:
        return SVD().factored(encoded)

    def rescaled(self, encoded: Encoded, scale: float | None, components: torch.Tensor | None) -> Encoded:
        return SVD().rescaled(encoded, scale, components)
