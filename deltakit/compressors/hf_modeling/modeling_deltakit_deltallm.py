"""A deltakit ``deltallm`` compressed model for ``transformers`` alone (``trust_remote_code=True``).

Shipped inside every deltallm output directory; it imports only torch and transformers. The config holds
the source architecture's fields (``deltakit_model_type`` names it) and the sharing plan
(``deltakit_plan["shared"]``: ``[follower module, anchor module]`` pairs; ``deltakit_plan["rank"]``). The
model class builds the source architecture's causal LM (e.g. ``LlamaForCausalLM``) and replaces each
follower ``nn.Linear`` by :class:`SharedDeltaLinear` before the weights are loaded: it computes with its
anchor's weight (the same Parameter, stored and counted once) plus its own ``lora_A`` (out, r) @
``lora_B`` (r, in), so the stored tensors load by their own names and no follower weight is created::

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

_OWN_KEYS = ("model_type", "deltakit_model_type", "deltakit_plan", "auto_map", "architectures",
             "transformers_version")  # fmt: skip


class DeltakitDeltaLLMConfig(PretrainedConfig):
    """The source config's fields plus ``deltakit_model_type`` (source model_type) and ``deltakit_plan``."""

    model_type = "deltakit_deltallm"

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


class SharedDeltaLinear(nn.Module):
    """``y = x W_anchorᵀ + (x lora_Bᵀ) lora_Aᵀ + b``: x (..., in) -> (..., out).

    The anchor Linear is referenced, not registered, so its weight is neither in this module's state dict
    nor counted twice; lora_A (out, r), lora_B (r, in) and the optional bias (out,) are this module's own.
    """

    def __init__(self, anchor: nn.Linear, rank: int, bias: bool):
        super().__init__()
        object.__setattr__(self, "_anchor", anchor)  # plain attribute: not a submodule
        out_features, in_features = anchor.weight.shape
        self.in_features, self.out_features = in_features, out_features
        dtype = anchor.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))  # (out, r)
        self.lora_B = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype))  # (r, in)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @property
    def weight(self) -> nn.Parameter:
        """The anchor's weight Parameter (out, in), shared."""
        return self._anchor.weight

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_B), self.lora_A)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, shared weight"


def _install_shared(model: nn.Module, shared: list[list[str]], rank: int) -> None:
    """Replace each follower ``nn.Linear`` of ``shared`` by a :class:`SharedDeltaLinear` (mutates ``model``)."""
    for follower_name, anchor_name in shared:
        follower, anchor = model.get_submodule(follower_name), model.get_submodule(anchor_name)
        if not isinstance(follower, nn.Linear) or not isinstance(anchor, nn.Linear):
            raise ValueError(f"deltakit_plan shares {follower_name} / {anchor_name}: both must be nn.Linear")
        if follower.weight.shape != anchor.weight.shape:
            raise ValueError(f"deltakit_plan shares {follower_name} with {anchor_name} of another shape")
        module = SharedDeltaLinear(anchor, int(rank), follower.bias is not None)
        parent, _, child = follower_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)


class _CompressedMixin:
    """Put before the source causal-LM class: builds it from the source config, then installs the plan."""

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any):
        if not isinstance(config, DeltakitDeltaLLMConfig):
            raise ValueError(
                f"a deltakit deltallm model needs a DeltakitDeltaLLMConfig, got {type(config).__name__}"
            )
        deltakit_config = config
        super().__init__(config.source_config(), *args, **kwargs)
        self.deltakit_config = deltakit_config
        plan = deltakit_config.deltakit_plan
        _install_shared(self, plan.get("shared", []), int(plan.get("rank", 0)))

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """Weights as the source class saves them; the compressed config and this file beside them."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.deltakit_config.save_pretrained(save_directory)
        target = Path(save_directory) / Path(__file__).name
        if not target.exists() or not target.samefile(__file__):
            shutil.copyfile(__file__, target)


_CLASSES: dict[type, type] = {}


def compressed_class(config: DeltakitDeltaLLMConfig) -> type:
    """The source causal-LM class with :class:`_CompressedMixin` in front (one class per source class)."""
    source = MODEL_FOR_CAUSAL_LM_MAPPING[type(config.source_config())]
    if source not in _CLASSES:
        _CLASSES[source] = type(f"DeltakitDeltaLLM{source.__name__}", (_CompressedMixin, source), {})
    return _CLASSES[source]


class DeltakitDeltaLLMForCausalLM(PreTrainedModel):
    """Entry point for ``AutoModelForCausalLM``: hands over to :func:`compressed_class` of the config."""

    config_class = DeltakitDeltaLLMConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> nn.Module:
        config = kwargs.pop("config", None)
        if not isinstance(config, DeltakitDeltaLLMConfig):
            config = DeltakitDeltaLLMConfig.from_pretrained(pretrained_model_name_or_path)
        return compressed_class(config).from_pretrained(
            pretrained_model_name_or_path, *args, config=config, **kwargs
        )

    @classmethod
    def _from_config(cls, config: DeltakitDeltaLLMConfig, **kwargs: Any) -> nn.Module:
        return compressed_class(config)._from_config(config, **kwargs)
