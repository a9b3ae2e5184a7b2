"""Modules of a DeltaLLM model: a Linear that reuses its anchor's weight plus its own low-rank delta.

:class:`DeltaLinear` holds the anchor's ``weight`` *Parameter object* (so ``model.parameters()``, which
deduplicates by identity, counts it once), its own ``lora_A`` (out, r) and ``lora_B`` (r, in), and its own
bias if it had one. During distillation it may also hold the follower's original weight as a non-persistent
buffer and switch between the original and the compressed path (Progressive Module Replacement).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltakit.deltallm.plan import SharingPlan
from deltakit.errors import FormatError
from deltakit.ops.svd import svd_factors as svd_factors  # re-exported for the deltallm modules


class DeltaLinear(nn.Module):
    """``y = x W_anchorᵀ + (x Bᵀ) Aᵀ + b``: a shared weight plus a low-rank delta.

    weight: the anchor Linear's Parameter (out, in), shared, frozen; lora_A (out, r), lora_B (r, in): own
    Parameters; bias: own (out,) or None. ``original`` (out, in), when set, is the follower's own weight,
    used instead of the compressed path while ``use_delta`` is False.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        bias: nn.Parameter | None = None,
        original: torch.Tensor | None = None,
    ):
        super().__init__()
        out_features, in_features = weight.shape
        if (
            lora_a.shape[0] != out_features
            or lora_b.shape[1] != in_features
            or lora_a.shape[1] != lora_b.shape[0]
        ):
            raise ValueError(
                f"factors {tuple(lora_a.shape)} @ {tuple(lora_b.shape)} do not fit weight "
                f"{tuple(weight.shape)}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight  # shared with the anchor: same Parameter object
        self.lora_A = nn.Parameter(lora_a)  # (out, r)
        self.lora_B = nn.Parameter(lora_b)  # (r, in)
        self.bias = bias
        self.register_buffer("original", original, persistent=False)  # (out, in) or None
        self.use_delta = True

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out), in the weight's dtype."""
        if not self.use_delta:
            if self.original is None:
                raise RuntimeError("DeltaLinear has no original weight to fall back to")
            return F.linear(x, self.original, self.bias)
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_B), self.lora_A)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W_anchor + A @ B`` (out, in) computed in fp32, cast to ``dtype`` (default: the weight's)."""
        merged = self.weight.float() + self.lora_A.float() @ self.lora_B.float()
        return merged.to(dtype or self.weight.dtype)

    def drop_original_(self) -> None:
        """Free the follower's original weight (in place); afterwards only the compressed path exists."""
        self.original = None
        self.use_delta = True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, shared weight"


class LowRankLinear(nn.Module):
    """``y = (x Bᵀ) Aᵀ + b``: a plain truncated-SVD replacement (the SVD baseline). A (out, r), B (r, in)."""

    def __init__(self, lora_a: torch.Tensor, lora_b: torch.Tensor, bias: nn.Parameter | None = None):
        super().__init__()
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(lora_b)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.lora_B), self.lora_A, self.bias)


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FormatError(f"the model has no module {name!r}") from None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def install_deltas_(
    model: nn.Module,
    plan: SharingPlan,
    *,
    init: str = "svd",
    keep_original: bool = False,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> dict[str, DeltaLinear]:
    """Replace every follower Linear of ``plan`` by a :class:`DeltaLinear` sharing its anchor's weight (in place).

    init: ``svd`` (A, B from the truncated SVD of W_follower − W_anchor) or ``zeros`` (placeholders to be
    loaded). keep_original: keep the follower's own weight as a buffer (for PMR training and teacher runs).
    dtype: dtype of A, B (default: the weight's). Returns ``{follower module name: DeltaLinear}``.
    """
    out: dict[str, DeltaLinear] = {}
    for follower_name, anchor_name in plan.shared_modules():
        follower = get_module(model, follower_name)
        anchor = get_module(model, anchor_name)
        if not isinstance(follower, nn.Linear) or not isinstance(anchor, nn.Linear):
            raise FormatError(
                f"{follower_name} / {anchor_name} are {type(follower).__name__} / "
                f"{type(anchor).__name__}, expected nn.Linear"
            )
        weight = anchor.weight  # (out, in), shared
        factor_dtype = dtype or weight.dtype
        if init == "svd":
            with torch.no_grad():
                diff = follower.weight.float() - weight.float()  # (out, in)
                a, b = svd_factors(diff, plan.rank, seed=seed)
            a, b = (
                a.to(device=weight.device, dtype=factor_dtype),
                b.to(device=weight.device, dtype=factor_dtype),
            )
        elif init == "zeros":
            a = torch.zeros(weight.shape[0], plan.rank, dtype=factor_dtype, device=weight.device)
            b = torch.zeros(plan.rank, weight.shape[1], dtype=factor_dtype, device=weight.device)
        else:
            raise ValueError(f"unknown init {init!r}; choose svd or zeros")
        original = follower.weight.detach() if keep_original else None
        module = DeltaLinear(weight, a, b, bias=follower.bias, original=original)
        set_module(model, follower_name, module)
        out[follower_name] = module
    return out


def set_replacement_(deltas: dict[str, DeltaLinear], plan: SharingPlan, compressed_blocks: set[int]) -> None:
    """Switch each follower block to its compressed path (in ``compressed_blocks``) or its original (in place)."""
    for f in plan.followers:
        on = f in compressed_blocks
        for kind in plan.kinds:
            deltas[plan.module_name(f, kind)].use_delta = on


def count_parameters(model: nn.Module) -> int:
    """Unique parameter elements (``model.parameters()`` deduplicates shared Parameters)."""
    return sum(p.numel() for p in model.parameters())
