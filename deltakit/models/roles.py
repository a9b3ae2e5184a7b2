"""What each tensor of a checkpoint is, inferred from its name and shape (no per-architecture tables).

Roles:
- ``linear``: a 2-D weight inside a decoder block (attention or MLP projection);
- ``embedding``: token or position embedding table (2-D, name says embed/wte/wpe);
- ``lm_head``: the output projection (2-D, outside the blocks);
- ``norm``: a 1-D scale of a normalisation layer; ``bias``: a 1-D bias; ``other``: anything else.

Layout: ``out_in`` for ``nn.Linear`` weights (out × in), ``in_out`` for GPT-2 style ``Conv1D`` weights
(stored transposed). A 2-D block weight whose sibling bias matches its second dimension rather than
its first is ``in_out``; otherwise ``out_in``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from deltakit.format.safetensors_io import TensorSpec

LINEAR, EMBEDDING, LM_HEAD, NORM, BIAS, OTHER = "linear", "embedding", "lm_head", "norm", "bias", "other"
ROLES = (LINEAR, EMBEDDING, LM_HEAD, NORM, BIAS, OTHER)

# a numbered block: ".layers.3.", ".h.3.", ".blocks.3.", ".layer.3." ...
_BLOCK = re.compile(r"\.(\d+)\.")
_EMBED = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|tok_embeddings)")
_HEAD = re.compile(r"(lm_head|output\.weight$|embed_out)")
_NORM = re.compile(r"(norm|ln_|layernorm|\.ln\d*\.)", re.IGNORECASE)


@dataclass(frozen=True)
class TensorRole:
    """Role of a tensor, its block index (None outside blocks) and its matrix layout."""

    role: str
    block: int | None = None
    layout: str = "out_in"

    @property
    def is_matrix(self) -> bool:
        return self.role in (LINEAR, EMBEDDING, LM_HEAD)


def block_index(name: str) -> int | None:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


def infer_role(spec: TensorSpec, siblings: dict[str, TensorSpec] | None = None) -> TensorRole:
    """Role of ``spec`` given the other tensors of the checkpoint (used to detect Conv1D layout)."""
    name = spec.name
    block = block_index(name)
    ndim = len(spec.shape)
    if ndim == 2:
        if _EMBED.search(name):
            return TensorRole(EMBEDDING, block)
        if _HEAD.search(name) and block is None:
            return TensorRole(LM_HEAD, None)
        layout = "out_in"
        if siblings is not None and name.endswith(".weight"):
            bias = siblings.get(name[: -len(".weight")] + ".bias")
            rows, cols = spec.shape
            if bias is not None and len(bias.shape) == 1 and rows != cols and bias.shape[0] == cols:
                layout = "in_out"
        if block is not None:
            return TensorRole(LINEAR, block, layout)
        return TensorRole(OTHER, None, layout)
    if ndim == 1:
        if name.endswith(".bias"):
            return TensorRole(BIAS, block)
        if _NORM.search(name) or name.endswith(".weight"):
            return TensorRole(NORM, block)
    return TensorRole(OTHER, block)


def infer_roles(specs: dict[str, TensorSpec]) -> dict[str, TensorRole]:
    """Roles of every tensor of a checkpoint (``specs`` maps name -> spec)."""
    return {name: infer_role(spec, specs) for name, spec in specs.items()}
