"""A deltakit ``lillama`` compressed model for ``transformers`` alone (``trust_remote_code=True``).

Shipped inside every lillama output directory; it imports only torch and transformers. The config holds
the source architecture's fields (``deltakit_model_type`` names it) and the compression plan
(``deltakit_plan["ranks"]``: ``{module path: rank}``). The model class builds the source architecture's
causal LM (e.g. ``LlamaForCausalLM``) and replaces each planned ``nn.Linear`` by :class:`LowRankLinear`
before the weights are loaded, so the stored ``<module>.down.weight`` (r, in) / ``<module>.up.weight``
(out, r) tensors load by their own names and no dense weight is created for them::

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

_OWN_KEYS = ("model_type", "deltakit_model_type", "deltakit_plan", "auto_map", "architectures",
             "transformers_version")  # fmt: skip


class DeltakitLillamaConfig(PretrainedConfig):
    """The source config's fields plus ``deltakit_model_type`` (source model_type) and ``deltakit_plan``."""

    model_type = "deltakit_lillama"

    def __init__(self, deltakit_model_type: str = "llama", deltakit_plan: dict | None = None, **kwargs: Any):
        self.deltakit_model_type = deltakit_model_type
        self.deltakit_plan = dict(deltakit_plan or {})
        super().__init__(**kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        """Every field, not only those differing from defaults: the source class's defaults are not ours."""
        return self.to_dict()

    def source_config(self) -> PretrainedConfig:
        """The source architecture's config (e.g. a ``LlamaConfig``) built from the same fields."""
        data = {k: v for k, v in self.to_dict().items() if k not in _OWN_KEYS}
        config = AutoConfig.for_model(self.deltakit_model_type, **data)
        attn = getattr(self, "_attn_implementation_internal", None)
        if attn is not None:
            config._attn_implementation_internal = attn
        return config


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: x (..., in) -> (..., out); down.weight (r, in), up.weight (out, r), up.bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: Any = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _install_low_rank(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace every ``nn.Linear`` named in ``ranks`` by a :class:`LowRankLinear` (mutates ``model``)."""
    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"deltakit_plan names {name}, a {type(linear).__name__}, not an nn.Linear")
        module = LowRankLinear(
            linear.in_features, linear.out_features, int(rank), linear.bias is not None, linear.weight.dtype
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


class _CompressedMixin:
    """Put before the source causal-LM class: builds it from the source config, then installs the plan."""

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any):
        if not isinstance(config, DeltakitLillamaConfig):
            raise ValueError(
                f"a deltakit lillama model needs a DeltakitLillamaConfig, got {type(config).__name__}"
            )
        deltakit_config = config
        super().__init__(config.source_config(), *args, **kwargs)
        self.deltakit_config = deltakit_config
        _install_low_rank(self, deltakit_config.deltakit_plan.get("ranks", {}))

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Weights as the source class saves them; the compressed config and this file beside them."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.deltakit_config.save_pretrained(save_directory)
        target = Path(save_directory) / Path(__file__).name
        if not target.exists() or not target.samefile(__file__):
            shutil.copyfile(__file__, target)


_CLASSES: dict[type, type] = {}


def compressed_class(config: DeltakitLillamaConfig) -> type:
    """The source causal-LM class with :class:`_CompressedMixin` in front (one class per source class)."""
    source = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.source_config())]
    if source not in _CLASSES:
        _CLASSES[source] = type(f"DeltakitLillama{source.__name__}", (_CompressedMixin, source), {})
    return _CLASSES[source]


class DeltakitLillamaForCausalLM(PreTrainedModel):
    """Entry point for ``AutoModelForCausalLM``: hands over to :func:`compressed_class` of the config."""

    config_class = DeltakitLillamaConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> nn.Module:
        config = kwargs.pop("config", None)
        if not isinstance(config, DeltakitLillamaConfig):
            config = DeltakitLillamaConfig.from_pretrained(pretrained_model_name_or_path)
        return compressed_class(config).from_pretrained(
            pretrained_model_name_or_path, *args, config=config, **kwargs
        )

    @classmethod
    def _from_config(cls, config: DeltakitLillamaConfig, **kwargs: Any) -> nn.Module:
        return compressed_class(config)._from_config(config, **kwargs)
