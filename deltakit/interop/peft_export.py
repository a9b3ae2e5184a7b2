"""A low-rank deltakit delta as a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``).

Conventions (PEFT LoRA): one target module per encoded ``<module>.weight``; keys
``base_model.model.<module>.lora_A.weight`` (r, in) and ``lora_B.weight`` (out, r) (untied embeddings:
``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r)); ``scaling = alpha / r``
is kept at 1 by ``lora_alpha = r`` and ``alpha_pattern[module] = rank_pattern[module]``; GPT-2 Conv1D
layers (``in_out`` layout) set ``fan_in_fan_out``. Factors come from the codec's :class:`FactoredView`.
What an adapter cannot hold (passthrough tensors such as norms and biases, tied embeddings, grown rows) is
refused; a sign part is refused unless ``fold_rank`` folds sign part + low rank into a rank-R SVD, and
modules whose tensors are all stored exactly (norms) are written whole as ``modules_to_save`` on request.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from deltakit.core.decode import Decoder, load_delta
from deltakit.errors import UsageError
from deltakit.format.atomic import atomic_directory
from deltakit.format.manifest import ENCODED, PASSTHROUGH, UNCHANGED, TensorEntry
from deltakit.ops.bitpack import unpack_signs
from deltakit.ops.svd import svd_factors

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class ExportReport:
    """What the adapter holds: LoRA modules, folded (approximated) ones, modules_to_save, skipped tensors."""

    output: str
    lora_modules: dict[str, int] = field(default_factory=dict)  # module -> rank
    folded: dict[str, float] = field(default_factory=dict)  # module -> relative error of the fold
    modules_to_save: list[str] = field(default_factory=list)  # modules written whole (exact tensors)
    unchanged: int = 0
    kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _module_of(name: str) -> str | None:
    return name[: -len(".weight")] if name.endswith(".weight") else None


def _lora_pair(up: torch.Tensor, down: torch.Tensor, layout: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) in fp32 from stored-layout factors up (rows, r), down (r, cols)."""
    up, down = up.to(torch.float32), down.to(torch.float32)
    if layout == "in_out":  # stored (in, out): ΔWᵀ = downᵀ·upᵀ, so B = downᵀ (out, r), A = upᵀ (r, in)
        return up.T.contiguous(), down.T.contiguous()
    return down.contiguous(), up.contiguous()


def _dense_view(view: Any) -> torch.Tensor:
    """The view's dense fp32 matrix (rows, cols): scale·S + up·down."""
    dense = torch.zeros(view.shape, dtype=torch.float32)
    if view.signs is not None:
        dense += float(view.scale) * unpack_signs(view.signs, view.shape, "cpu").to(torch.float32)
    if view.has_low_rank:
        dense += view.up.to(torch.float32) @ view.down.to(torch.float32)
    return dense


def _fold(view: Any, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-``rank`` exact-SVD factors of the dense view and the relative Frobenius error of the fold."""
    dense = _dense_view(view)
    rank = min(rank, *view.shape)
    up, down = svd_factors(dense, rank, method="exact", oversample=0, power_iters=0, seed=0)
    error = float((dense - up @ down).norm() / dense.norm().clamp_min(1e-30))
    return up, down, error


class _Plan:
    """Sorting a delta's tensors into LoRA pairs, full tensors to save, and refusals."""

    def __init__(self, decoder: Decoder, fold_rank: int | None, modules_to_save: bool = False):
        self.decoder, self.fold_rank, self.save_full = decoder, fold_rank, modules_to_save
        self.full: dict[str, torch.Tensor] = {}  # checkpoint name -> exact tensor
        self.tensors: dict[str, torch.Tensor] = {}
        self.report = ExportReport("")
        self.refused: list[str] = []
        self.layouts: set[str] = set()

    def add(self, name: str, entry: TensorEntry) -> None:
        if entry.kind == UNCHANGED:
            self.report.unchanged += 1
            return
        module = _module_of(name)
        lora_role = entry.role in ("linear", "lm_head") or (entry.role == "embedding" and self._untied())
        if entry.kind == ENCODED and module and lora_role and not entry.extra_rows:
            self._add_encoded(name, module, entry)
        elif self.save_full and entry.kind == PASSTHROUGH and entry.in_base and "." in name:
            self.full[name] = self.decoder.delta.exact(name)
        else:
            why = (
                "tied to the output head"
                if entry.role == "embedding" and entry.kind == ENCODED
                else entry.kind
            )
            self.refused.append(f"{name} ({entry.role}, {why})")

    def _add_encoded(self, name: str, module: str, entry: TensorEntry) -> None:
        view = self.decoder.codec.factored(self.decoder.encoded(name))
        if view is None:
            self.refused.append(f"{name} (codec {self.decoder.codec.name} has no factored view)")
            return
        if view.signs is None or (view.scale == 0.0 and view.has_low_rank):
            up, down = view.up, view.down
        elif self.fold_rank is not None:
            up, down, error = _fold(view, self.fold_rank)
            self.report.folded[module] = round(error, 6)
        else:
            self.refused.append(f"{name} (sign part)")
            return
        if entry.role == "embedding":  # PEFT: ΔW (vocab, dim) = (B·A)ᵀ with A (r, vocab), B (dim, r)
            lora_a, lora_b = _lora_pair(up, down, "in_out")
            self.tensors[f"{PREFIX}{module}.lora_embedding_A"] = lora_a
            self.tensors[f"{PREFIX}{module}.lora_embedding_B"] = lora_b
        else:
            lora_a, lora_b = _lora_pair(up, down, entry.layout)
            self.tensors[f"{PREFIX}{module}.lora_A.weight"] = lora_a  # (r, in)
            self.tensors[f"{PREFIX}{module}.lora_B.weight"] = lora_b  # (out, r)
            self.layouts.add(entry.layout or "out_in")
        self.report.lora_modules[module] = int(lora_a.shape[0])

    def finish_full(self) -> None:
        """Modules whose every tensor is stored exactly become ``modules_to_save``; the others are refused.

        PEFT saves such a module whole, so a module with a LoRA-targeted or unchanged tensor cannot be one.
        """
        names = self.decoder.delta.manifest.tensors
        for module in sorted({n.rsplit(".", 1)[0] for n in self.full}):
            own = [n for n in names if n.rsplit(".", 1)[0] == module]
            if module in self.report.lora_modules or any(n not in self.full for n in own):
                self.refused += [
                    f"{n} (passthrough in a module with other changes)" for n in own if n in self.full
                ]
                continue
            self.report.modules_to_save.append(module)
            self.tensors.update({f"{PREFIX}{n}": self.full[n].contiguous() for n in own})

    def _untied(self) -> bool:
        """Whether the checkpoint stores its own output head (PEFT's embedding LoRA does not reach a tied one)."""
        return any(n.endswith("lm_head.weight") for n in self.decoder.delta.manifest.tensors)


def adapter_config(
    ranks: dict[str, int], base_name: str, fan_in_fan_out: bool, modules_to_save: list[str] | None = None
) -> dict[str, Any]:
    """PEFT LoRA config for ``ranks`` (module -> r) with scaling alpha/r = 1 for every module."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {m: k for m, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": modules_to_save or None,
        "inference_mode": True,
    }


def export_peft(
    delta: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    fold_rank: int | None = None,
    modules_to_save: bool = False,
    base_name: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write delta directory ``delta`` as a PEFT LoRA adapter directory ``output`` (atomically).

    fold_rank: fold sign parts (with their low rank) into rank-``fold_rank`` SVD factors instead of
    refusing them. modules_to_save: write modules whose tensors are all stored exactly (norms, GPT-2
    layer norms) whole, as PEFT ``modules_to_save``. base_name: ``base_model_name_or_path`` (default: the delta's recorded base name).
    Raises UsageError counting the tensors the adapter cannot hold (naming the first four); mixed Conv1D and Linear layouts are
    refused (PEFT's ``fan_in_fan_out`` is one flag per adapter).
    """
    if fold_rank is not None and fold_rank < 1:
        raise UsageError(f"fold_rank must be >= 1, got {fold_rank}")
    decoder = Decoder.of(load_delta(delta))
    plan = _Plan(decoder, fold_rank, modules_to_save)
    for name, entry in decoder.delta.manifest.tensors.items():
        plan.add(name, entry)
    plan.finish_full()
    if plan.refused:
        hint = " (fold_rank= folds sign parts)" if any("sign part" in r for r in plan.refused) else ""
        if not modules_to_save and any("passthrough" in r for r in plan.refused):
            hint += " (modules_to_save=True writes exact norms whole)"
        shown = ", ".join(plan.refused[:4]) + (
            f", … ({len(plan.refused) - 4} more)" if len(plan.refused) > 4 else ""
        )
        raise UsageError(f"a LoRA adapter cannot hold {len(plan.refused)} tensor(s){hint}: {shown}")
    if not plan.tensors:
        raise UsageError(f"{delta}: the delta changes no low-rank linear layer; nothing to export")
    if len(plan.layouts) > 1:
        raise UsageError("the delta mixes Conv1D (in_out) and Linear layouts; one adapter cannot hold both")
    config = adapter_config(
        plan.report.lora_modules,
        base_name or decoder.delta.manifest.base.name,
        plan.layouts == {"in_out"},
        plan.report.modules_to_save,
    )
    with atomic_directory(output, overwrite=overwrite) as tmp:
        save_file(plan.tensors, str(Path(tmp) / WEIGHTS_FILE), metadata={"format": "pt"})
        (Path(tmp) / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    plan.report.output = str(output)
    return plan.report
