"""Data-aware refinement of a delta's per-matrix scales (BitDelta's scale distillation), opt-in.

A codec whose factored view has a sign part ``S`` and whose params hold its fp32 ``scale`` (``bitdelta``,
``dqrelo``; decided by :func:`supports_refinement`, not by a list of names) rebuilds each matrix as
``W = W_base + scale·S (+ up·down)``. :func:`refine_scales` keeps everything but the scales frozen and
fits one scalar per matrix so that the rebuilt model's next-token distributions match the fine-tune's on
calibration windows: Adam on ``KL(fine-tune ‖ rebuilt)``, the fine-tune's logits computed once per batch
without gradients. Each scale is trained relative to its data-free value, ``scale = scale₀·(1 + m)`` with
``m`` starting at 0, so one learning rate suits matrices whose scales differ by orders of magnitude.

Only the ``scale`` params change: the stored tensors are not touched and every scale stays one JSON
float, so the delta's bytes are identical in size (checked). The refined scales are used only when they
lower the KL on the evaluation windows; otherwise the data-free ones are kept (``stats.scale_refinement
.applied`` says which). A non-finite loss or scale is refused.

Memory: the fine-tune model in fp32 on ``device`` plus, per refined matrix, its frozen part
``W_base + up·down`` in fp32 and its signs as int8; the batch's logits twice.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from deltakit.codecs.base import Budget, Calibration, Codec, CodecConfig, EncodeContext, Encoded
from deltakit.codecs.registry import get_codec, list_codecs
from deltakit.core.decode import Decoder, codec_call
from deltakit.core.options import CompressOptions
from deltakit.distill.data import iter_minibatches, load_tokenizer
from deltakit.distill.pmr import logit_kl
from deltakit.errors import DeltakitError, NonFiniteError, TensorMismatchError, UsageError
from deltakit.format.delta import Delta
from deltakit.format.manifest import ENCODED, Manifest
from deltakit.lillama.model import quiet_load
from deltakit.models.checkpoint import TensorSource
from deltakit.ops.bitpack import unpack_signs
from deltakit.ops.threads import torch_threads

#: where the report lands in the manifest's stats
STATS_KEY = "scale_refinement"
#: windows on which the KL is measured before and after (at least one batch)
EVAL_WINDOWS = 8


@dataclass(frozen=True)
class RefineSettings:
    """Adam steps, learning rate (relative to each data-free scale), windows per step and the seed that
    orders the minibatches (defaults: :class:`~deltakit.core.options.CompressOptions`' ``refine_*``)."""

    steps: int
    lr: float
    batch_size: int
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                name = "refine_batch" if key == "batch_size" else f"refine_{key}"
                raise UsageError(f"{name}={value!r} is not valid: give an integer >= 1")
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, int | float)
            or not (math.isfinite(self.lr) and self.lr > 0)
        ):
            raise UsageError(f"refine_lr={self.lr!r} is not valid: give a finite number > 0")


def sign_scale(codec: Codec, encoded: Encoded) -> tuple[torch.Tensor, tuple[int, int]] | None:
    """(packed signs, shape) of an encoded matrix whose scale refinement can fit, else None.

    Refinable: the codec's factored view has a sign part and the params hold a float ``scale`` equal to
    the view's (so the view's ``scale·S`` is what that param sets).
    """
    view = codec.factored(encoded)
    scale = encoded.params.get("scale")
    if view is None or view.signs is None or isinstance(scale, bool) or not isinstance(scale, float):
        return None
    if view.scale != scale or len(view.shape) != 2:
        return None
    return view.signs, (int(view.shape[0]), int(view.shape[1]))


def supports_refinement(codec: Codec, config: CodecConfig | None = None) -> bool:
    """Whether ``codec`` stores a per-matrix scale for a sign part: encodes a seeded 32×32 probe (at its
    default budget) and asks :func:`sign_scale`."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(32, 32, generator=generator)
    target = base + 0.1 * torch.randn(32, 32, generator=generator)
    cfg = config if config is not None else codec.config_class()
    ctx = EncodeContext(budget=Budget(ratio=codec.default_ratio), name="probe")
    try:
        with torch_threads(1):
            encoded = codec.encode(base, target, cfg, ctx)
            return sign_scale(codec, encoded) is not None
    except (DeltakitError, TypeError, ValueError, KeyError, RuntimeError, AttributeError):
        return False


def refinable_codecs() -> list[str]:
    """Names of the registered codecs :func:`supports_refinement` accepts."""
    return [name for name in list_codecs() if supports_refinement(get_codec(name))]


def check_refinable(codec: Codec, config: CodecConfig) -> None:
    """Refuse a codec with no per-matrix scale, naming the ones that have one."""
    if not supports_refinement(codec, config):
        names = ", ".join(refinable_codecs()) or "none registered"
        raise UsageError(
            f"refine_scales=True fits the per-matrix scale of a sign part; {codec.name} has none "
            f"(codecs that have one: {names})"
        )


class _Student:
    """The rebuilt model's encoded matrices: ``W_i = fixed_i + scale₀_i·(1 + m_i)·S_i`` for refinable
    matrices (``m`` trainable, (n,) fp32) and ``W = fixed`` for the other encoded ones."""

    def __init__(self, device: torch.device):
        self.names: list[str] = []
        self.fixed: dict[str, torch.Tensor] = {}  # full tensor shape, fp32
        self.signs: dict[str, torch.Tensor] = {}  # same shape, int8 ±1 (0 on grown rows)
        self.scale0: list[float] = []
        self.device = device
        self.m = torch.zeros(0)

    def add(self, name: str, fixed: torch.Tensor, signs: torch.Tensor | None, scale: float) -> None:
        self.fixed[name] = fixed.to(self.device)
        if signs is not None:
            self.names.append(name)
            self.signs[name] = signs.to(self.device)
            self.scale0.append(scale)

    def start(self) -> None:
        self.m = torch.zeros(len(self.names), device=self.device, requires_grad=True)

    def scales(self) -> torch.Tensor:
        """(n,) fp32 scales of the refinable matrices, in :attr:`names` order."""
        return torch.tensor(self.scale0, device=self.device) * (1 + self.m)

    def weights(self) -> dict[str, torch.Tensor]:
        """Parameter overrides for :func:`torch.func.functional_call` (differentiable in ``m``)."""
        out = dict(self.fixed)
        for name, scale in zip(self.names, self.scales(), strict=True):
            out[name] = self.fixed[name] + scale * self.signs[name]
        return out


def _matrix_parts(
    decoder: Decoder, name: str, base: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(fixed part fp32, int8 signs or None, data-free scale) of encoded tensor ``name``, full shape."""
    entry = decoder.delta.entry(name)
    encoded = decoder.encoded(name)
    found = codec_call(name, lambda: sign_scale(decoder.codec, encoded))
    base32 = decoder.check_base(name, entry, base).to(torch.float32)
    extra = decoder.delta.exact(name, "extra_rows").float() if entry.extra_rows is not None else None
    if found is None:
        fixed = base32 + decoder.delta_fp32(name, base)
        signs = None
        scale = 0.0
    else:
        packed, shape = found
        scale = float(encoded.params["scale"])
        zero = Encoded(encoded.tensors, {**encoded.params, "scale": 0.0})
        fixed = base32 + codec_call(name, lambda: decoder.codec.decode(zero, "cpu", base=base))
        signs = unpack_signs(packed, shape, "cpu").to(torch.int8)  # (rows, cols) ±1
        if extra is not None:
            signs = torch.cat([signs, torch.zeros(extra.shape, dtype=torch.int8)])
    if extra is not None:
        fixed = torch.cat([fixed, extra])
    return fixed, signs, scale


def _student(delta: Delta, codec: Codec, base: TensorSource, model: torch.nn.Module, device) -> _Student:
    """Every encoded tensor of ``delta`` as a student part; names must be parameters of ``model``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    decoder = Decoder(delta, codec)
    student = _Student(device)
    base_names = set(base.names())
    for name, entry in delta.manifest.tensors.items():
        if entry.kind != ENCODED:
            continue
        if name not in params or list(params[name].shape) != entry.shape:
            raise TensorMismatchError(
                f"refine_scales: tensor {name} is not a parameter of the loaded model with shape "
                f"{entry.shape}; this architecture renames weights on load and cannot be refined"
            )
        fixed, signs, scale = _matrix_parts(decoder, name, base.get(name) if name in base_names else None)
        student.add(name, fixed, signs, scale)
    student.start()
    return student


def _batch_kl(model: torch.nn.Module, weights: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """KL(fine-tune ‖ rebuilt) over every next-token distribution of ``batch`` (b, seq) int64."""
    with torch.no_grad():
        teacher = model(input_ids=batch, use_cache=False).logits  # (b, seq, vocab)
    student = functional_call(model, weights, args=(), kwargs={"input_ids": batch, "use_cache": False})
    return logit_kl(student.logits, teacher)


def _mean_kl(model, student: _Student, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean KL over ``windows`` (n, seq) with the student's current scales."""
    total = 0.0
    with torch.no_grad():
        weights = student.weights()
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(student.device)
            total += float(_batch_kl(model, weights, batch)) * batch.shape[0]
    return total / windows.shape[0]


def _fit(model, student: _Student, windows: torch.Tensor, settings: RefineSettings, progress) -> None:
    """``settings.steps`` Adam steps on minibatches of ``windows`` in a seeded order (cycled as needed)."""
    optimizer = torch.optim.Adam([student.m], lr=settings.lr)
    epochs = math.ceil(settings.steps * settings.batch_size / windows.shape[0]) + 1
    batches = iter_minibatches(windows, settings.batch_size, seed=settings.seed, epochs=epochs)
    for step in range(settings.steps):
        if progress is not None:
            progress(step, settings.steps, "refine scales")
        loss = _batch_kl(model, student.weights(), next(batches).to(student.device))
        if not torch.isfinite(loss):
            raise NonFiniteError(f"refine_scales: the KL became NaN or Inf at step {step}; lower refine_lr=")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if progress is not None:
        progress(settings.steps, settings.steps, "refine scales")


def _footprint(manifest: Manifest) -> dict[str, tuple[Any, ...]]:
    """Per tensor: kind, stored keys, param names and the number of float params (what sizes depend on)."""
    return {
        name: (
            e.kind,
            tuple(sorted(e.stored.items())),
            tuple(sorted(e.params)),
            sum(isinstance(v, float) for v in e.params.values()),
        )
        for name, e in manifest.tensors.items()
    }


def refine_scales(
    delta: Delta,
    base: TensorSource,
    model_dir: Path,
    windows: torch.Tensor,
    settings: RefineSettings,
    device: torch.device,
    progress: Any = None,
) -> dict[str, Any]:
    """Fit the scales of ``delta``'s refinable matrices on ``windows``; returns the report.

    delta: in memory or read back (its stored tensors are read, never written). base: the base model's
    tensors. model_dir: the fine-tune's checkpoint directory (its model is the teacher and, with the
    encoded matrices replaced, the student). windows: (n, seq) int64 calibration tokens.
    Mutates ``delta.manifest``: the refined ``params["scale"]`` of each refinable matrix (when they lower
    the KL) and ``stats["scale_refinement"]`` (the report). On the CPU it runs on one thread, so the
    scales do not depend on the thread count.
    """
    settings.validate()
    codec = Decoder.of(delta).codec
    before_sizes = _footprint(delta.manifest)
    with torch_threads(1) if device.type == "cpu" else contextlib.nullcontext():
        model = quiet_load(Path(model_dir)).to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        student = _student(delta, codec, base, model, device)
        if not student.names:
            raise UsageError(f"refine_scales: no encoded matrix of this {codec.name} delta has a scale")
        held = windows[: max(EVAL_WINDOWS, settings.batch_size)]
        kl_before = _mean_kl(model, student, held, settings.batch_size)
        _fit(model, student, windows, settings, progress)
        kl_fitted = _mean_kl(model, student, held, settings.batch_size)
        fitted = student.scales().detach().cpu().tolist()
    report = _write_scales(delta.manifest, student, fitted, kl_before, kl_fitted)
    report.update(
        steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed,
        windows=int(windows.shape[0]), seq_len=int(windows.shape[1]), tokens=int(windows.numel()),
        eval_windows=int(held.shape[0]),
    )  # fmt: skip
    delta.manifest.stats[STATS_KEY] = report
    if _footprint(delta.manifest) != before_sizes:
        raise AssertionError("refine_scales changed more than the scale params of the delta")
    return report


def _write_scales(
    manifest: Manifest, student: _Student, fitted: list[float], kl_before: float, kl_fitted: float
) -> dict[str, Any]:
    """Set each refinable matrix's ``scale`` to its fitted value when the KL dropped; the report's core."""
    bad = [name for name, s in zip(student.names, fitted, strict=True) if not math.isfinite(s)]
    if bad or not math.isfinite(kl_fitted):
        raise NonFiniteError(
            f"refine_scales: the fitted scale of {bad[0] if bad else 'the model'} is NaN or Inf; "
            "lower refine_lr="
        )
    applied = kl_fitted < kl_before
    if applied:
        for name, scale in zip(student.names, fitted, strict=True):
            manifest.tensors[name].params["scale"] = float(scale)
    changes = [abs(s / s0 - 1) for s, s0 in zip(fitted, student.scale0, strict=True) if s0 != 0]
    return {
        "tensors": len(student.names),
        "kl_before": kl_before,
        "kl_fitted": kl_fitted,
        "kl_after": kl_fitted if applied else kl_before,
        "applied": applied,
        "max_relative_change": max(changes, default=0.0),
    }


@dataclass(frozen=True)
class Refinement:
    """What :func:`deltakit.compress` runs after encoding when ``refine_scales=True``: the calibration, the
    settings, the fine-tune's and base's directories and the device."""

    calibration: Calibration
    settings: RefineSettings
    model_dir: Path
    base_dir: Path
    device: torch.device

    @classmethod
    def of(
        cls,
        opts: CompressOptions,
        codec: Codec,
        config: CodecConfig,
        base: TensorSource,
        target: TensorSource,
        device: torch.device,
    ) -> Refinement | None:
        """None unless ``opts.refine_scales``; refuses missing data, bad settings, a codec with no scale
        and in-memory models before anything is encoded."""
        calibration = opts.scale_refinement()
        if calibration is None:
            return None
        settings = RefineSettings(opts.refine_steps, opts.refine_lr, opts.refine_batch, opts.seed)
        settings.validate()
        check_refinable(codec, config)
        base_dir, model_dir = getattr(base, "path", None), getattr(target, "path", None)
        if base_dir is None or model_dir is None:
            raise UsageError(
                "refine_scales=True runs the models: give base and fine-tune as checkpoint directories"
            )
        return cls(calibration, settings, Path(model_dir), Path(base_dir), device)

    def run(self, delta: Delta, base: TensorSource, progress: Any = None) -> dict[str, Any]:
        """Tokenise the calibration and :func:`refine_scales` ``delta`` (its manifest is updated)."""
        windows = self.calibration.batches(_tokenizer(self.model_dir, self.base_dir))  # (n, seq) int64
        return refine_scales(delta, base, self.model_dir, windows, self.settings, self.device, progress)


def _tokenizer(*dirs: Path) -> Any:
    """The tokenizer saved in the first of ``dirs`` that has one."""
    return load_tokenizer(*dirs, needed_for="refine_scales=True")
