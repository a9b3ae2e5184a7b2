"""The resident base model: loaded once onto a device, with pristine copies of what deltas touch.

A checkpoint tensor name maps to a model parameter; tied parameters (``lm_head.weight`` sharing
``model.embed_tokens.weight``) are one tensor under several names, so every name resolves to one
*canonical* name (the first under which the model lists the tensor). Pristine copies live in host
memory (pinned when the model is on CUDA) and are taken before any delta changes a parameter.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from deltakit.core.device import resolve_device
from deltakit.errors import TensorMismatchError, UsageError


def _dtype_arg(dtype: str | torch.dtype | None) -> str | torch.dtype:
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise UsageError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return value


class ResidentModel:
    """A causal LM held on ``device`` plus its tokenizer, base fingerprint and pristine store.

    model: a ``transformers`` causal LM in eval mode; its parameter *objects* never change (swaps
    write into ``param.data`` in place), so a compiled model stays valid.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        fingerprint: str,
        name: str,
        path: Path | None = None,
        checkpoint_dtypes: dict[str, torch.dtype] | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.name = name
        self.path = path
        self.device = next(model.parameters()).device
        #: checkpoint/state-dict name -> parameter (tied names share one parameter)
        self.params: dict[str, torch.nn.Parameter] = {}
        #: any name -> canonical name of the same tensor
        self.canonical: dict[str, str] = {}
        first_name: dict[int, str] = {}
        for pname, tensor in model.state_dict(keep_vars=True).items():
            if not isinstance(tensor, torch.nn.Parameter):
                continue
            self.params[pname] = tensor
            self.canonical[pname] = first_name.setdefault(id(tensor), pname)
        #: canonical name -> the dtype the checkpoint stores it in (where the model was loaded in another)
        self.checkpoint_dtypes: dict[str, torch.dtype] = {
            self.canonical[n]: d for n, d in (checkpoint_dtypes or {}).items() if n in self.canonical
        }
        self._pristine: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        base_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = "auto",
        name: str | None = None,
        fingerprint: str | None = None,
    ) -> ResidentModel:
        """Load ``base_dir`` (a Hugging Face checkpoint directory) with its tokenizer onto ``device``.

        fingerprint: the base fingerprint if already known (else computed from the checkpoint files,
        reading each tensor once, as ``deltakit.checkpoint_fingerprint`` does).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from deltakit.format.fingerprint import checkpoint_fingerprint
        from deltakit.models.checkpoint import open_checkpoint

        base_dir = Path(base_dir)
        dev = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=_dtype_arg(dtype))
        model.to(dev)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        fp = fingerprint or checkpoint_fingerprint(base_dir)
        stored = None
        if _dtype_arg(dtype) != "auto":
            reader = open_checkpoint(base_dir)
            stored = {n: reader.spec(n).dtype for n in reader.names()}
        return cls(model, tokenizer, fp, name or base_dir.name, base_dir, stored)

    def resolve(self, name: str) -> str:
        """Canonical parameter name for a checkpoint tensor name; unknown names are errors."""
        try:
            return self.canonical[name]
        except KeyError:
            raise TensorMismatchError(
                f"the served base model has no parameter {name!r} (a delta for another architecture?)"
            ) from None

    def param(self, canonical: str) -> torch.nn.Parameter:
        return self.params[canonical]

    def ensure_pristine(self, canonical: str) -> torch.Tensor:
        """The pristine host copy of a parameter, taken now if not yet held.

        Safe only while the parameter holds base values: the runtime calls this for every tensor of a
        delta before that delta is first activated, and a parameter no delta touched was never changed.
        The copy has the checkpoint's dtype when the model was loaded in a wider one (e.g. a bf16
        checkpoint served as float32: the upcast is exact, so the narrower copy loses nothing), else
        the parameter's dtype.
        """
        with self._lock:
            copy = self._pristine.get(canonical)
            if copy is None:
                data = self.params[canonical].detach()
                keep = self._pristine_dtype(canonical, data)
                copy = torch.empty(data.shape, dtype=keep, pin_memory=self.device.type == "cuda")
                copy.copy_(data)
                self._pristine[canonical] = copy
            return copy

    def _pristine_dtype(self, canonical: str, data: torch.Tensor) -> torch.dtype:
        stored = self.checkpoint_dtypes.get(canonical, data.dtype)
        narrower = stored.is_floating_point and stored.itemsize < data.dtype.itemsize
        if narrower and data.is_floating_point() and torch.equal(data.to(stored).to(data.dtype), data):
            return stored
        return data.dtype

    def pristine(self, canonical: str) -> torch.Tensor:
        return self._pristine[canonical]

    @property
    def pristine_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._pristine.values())
