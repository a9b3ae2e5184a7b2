"""Weight-space error between checkpoints, streamed one tensor at a time.

A *source* is a HF checkpoint dir (``*.safetensors`` shards, read lazily with ``safe_open``), a mapping of
name → tensor, or an ``nn.Module`` (its ``state_dict()``). All norms are computed in float64 on CPU from the
stored values (bf16 is upcast exactly).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from deltakit.errors import FormatError, TensorMismatchError
from deltakit.models.checkpoint import CheckpointReader, StateDictSource

Source = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module
"""Where tensors come from: a checkpoint dir (or one safetensors file), a name → tensor mapping, or a module."""

# Names that may legitimately be present on one side only: a tied LM head is stored once in HF checkpoints
# (as the embedding) but appears in a module's state_dict under both names.
_TIED_ALIASES = frozenset({"lm_head.weight"})


class TensorReader(contextlib.AbstractContextManager):
    """Random access to the tensors of a source by name; ``names()`` lists them. Use as a context manager.

    Checkpoint directories go through :class:`deltakit.models.checkpoint.CheckpointReader` (sharded
    safetensors, index, weights-only ``.bin``), one tensor at a time.
    """

    def __init__(self, source: Source):
        if isinstance(source, torch.nn.Module):
            source = source.state_dict()
        if isinstance(source, Mapping):
            self._source = StateDictSource({k: v.detach() for k, v in source.items()})
            return
        path = Path(source)
        if path.is_file():
            from safetensors.torch import load_file

            self._source = StateDictSource(load_file(path))
            return
        if not path.is_dir():
            raise FormatError(f"no weights at {path}")
        self._source = CheckpointReader(path)

    def names(self) -> list[str]:
        return sorted(self._source.names())

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as stored (dtype unchanged), CPU."""
        return self._source.get(name).cpu()

    def __exit__(self, *exc) -> None:
        self._source = StateDictSource({})


def _common_names(a: TensorReader, b: TensorReader, label: str) -> list[str]:
    na, nb = set(a.names()), set(b.names())
    odd = (na ^ nb) - _TIED_ALIASES
    if odd:
        raise TensorMismatchError(f"{label}: tensor names differ, e.g. {sorted(odd)[:3]} ({len(odd)} in all)")
    return sorted(na & nb)


def _sqnorm(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())


def relative_frobenius(a: Source, b: Source) -> dict[str, float]:
    """Per tensor ``‖a − b‖_F / ‖b‖_F`` (0 where both are zero, inf where only ``b`` is zero).

    ``a`` and ``b`` are sources with the same tensor names and shapes. Streams one tensor pair at a time.
    """
    out: dict[str, float] = {}
    with TensorReader(a) as ra, TensorReader(b) as rb:
        for name in _common_names(ra, rb, "relative_frobenius"):
            ta, tb = ra.get(name), rb.get(name)
            if ta.shape != tb.shape:
                raise TensorMismatchError(f"{name}: shape {tuple(ta.shape)} vs {tuple(tb.shape)}")
            out[name] = _ratio(_sqnorm(ta.double() - tb.double()), _sqnorm(tb))
    return out


def _ratio(num_sq: float, den_sq: float) -> float:
    if den_sq == 0.0:
        return 0.0 if num_sq == 0.0 else math.inf
    return math.sqrt(num_sq / den_sq)


def delta_relative_error(recon: Source, finetune: Source, base: Source) -> dict:
    """Error of a reconstruction relative to the true delta, per tensor and overall.

    Per tensor: ``‖W_recon − W_ft‖_F / ‖W_ft − W_base‖_F`` (0 = exact, 1 = as far as the base is); tensors the
    fine-tune did not change (Δ = 0) give 0 when the reconstruction left them alone, inf otherwise.
    ``overall`` pools the squared norms over every tensor: ``sqrt(Σ‖recon−ft‖² / Σ‖ft−base‖²)``.
    Returns ``{"overall": float, "per_tensor": {name: float}, "unchanged_tensors": int}``.
    """
    per: dict[str, float] = {}
    num_tot = den_tot = 0.0
    unchanged = 0
    with TensorReader(recon) as rr, TensorReader(finetune) as rf, TensorReader(base) as rb:
        names = _common_names(rr, rf, "reconstruction vs fine-tune")
        _common_names(rf, rb, "fine-tune vs base")
        for name in names:
            tr, tf, tb = rr.get(name).double(), rf.get(name).double(), rb.get(name).double()
            if not tr.shape == tf.shape == tb.shape:
                raise TensorMismatchError(
                    f"{name}: shapes {tuple(tr.shape)}, {tuple(tf.shape)}, {tuple(tb.shape)}"
                )
            num, den = _sqnorm(tr - tf), _sqnorm(tf - tb)
            unchanged += den == 0.0
            per[name] = _ratio(num, den)
            num_tot += num
            den_tot += den
    return {"overall": _ratio(num_tot, den_tot), "per_tensor": per, "unchanged_tensors": unchanged}


def iter_tensors(source: Source) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs of a source in name order, one at a time (as stored, CPU)."""
    with TensorReader(source) as r:
        for name in r.names():
            yield name, r.get(name)
