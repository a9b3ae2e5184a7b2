"""Low-rank replacements for ``nn.Linear``: a plain factorised Linear (model mode) and base + low-rank delta.

``LowRankLinear`` keeps ``down`` (in → r) and ``up`` (r → out) as two ``nn.Linear`` submodules, so its
state-dict keys are ``<module>.down.weight`` (r, in) and ``<module>.up.weight`` (out, r) (plus
``<module>.up.bias`` when the original had a bias). ``DeltaLinear`` computes ``x Wᵀ + x downᵀ upᵀ (+ b)``
with a frozen base weight W and trainable factors (delta mode). Both are initialised from a truncated SVD
with √S on each side.
"""

from __future__ import annotations

import torch
from torch import nn

from deltakit.ops.svd import svd_factors as svd_factors  # re-exported for the lillama modules


def break_even_rank(rows: int, cols: int) -> float:
    """Rank at which two factors cost as much as the dense matrix: ``rows·cols / (rows + cols)``.

    Only ranks strictly below it reduce the parameter count.
    """
    return rows * cols / (rows + cols)


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a rank-r stand-in for an ``nn.Linear(in, out)``.

    x: (..., in) -> (..., out). Parameters: down.weight (r, in), up.weight (out, r), up.bias (out,) or absent.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        *,
        seed: int = 0,
        method: str = "randomized",
        oversample: int = 10,
        power_iters: int = 2,
    ) -> LowRankLinear:
        """SVD-initialised replacement of ``linear`` (not mutated); fp32 parameters on its device."""
        weight = linear.weight.detach()  # (out, in)
        up, down = svd_factors(
            weight, rank, method=method, oversample=oversample, power_iters=power_iters, seed=seed
        )
        module = cls(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            dtype=torch.float32,
            device=weight.device,
        )
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if linear.bias is not None:
                module.up.bias.copy_(linear.bias.detach().float())
        return module

    def dense_weight(self) -> torch.Tensor:
        """fp32 ``up @ down``: (out, in)."""
        return self.up.weight.float() @ self.down.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class DeltaLinear(nn.Module):
    """``y = x Wᵀ + (x downᵀ) upᵀ + b``: a frozen base weight plus a trainable low-rank delta.

    weight: (out, in) base weight (a buffer, frozen); up (out, r), down (r, in) parameters; bias: (out,) buffer
    (the fine-tune's, stored exactly by the delta format) or None. Computed in the factors' dtype.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None,
        trainable: bool = True,
    ):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.up = nn.Parameter(up.detach().float().clone(), requires_grad=trainable)  # (out, r)
        self.down = nn.Parameter(down.detach().float().clone(), requires_grad=trainable)  # (r, in)

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)  # (..., out)
        return y + (x @ self.down.T) @ self.up.T

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, rank={self.rank}"


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` of ``root`` by ``module`` (mutates ``root``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
