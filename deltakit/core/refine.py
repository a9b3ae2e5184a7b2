"""Data-aware refinement of a delta's scales (BitDelta's scale distillation, extended to low rank), opt-in.

A codec whose factored view is ``W = W_base + scale·S + up·down`` and that can rescale its parts in the
stored tensors (:meth:`~deltakit.codecs.base.Codec.rescaled`: ``bitdelta``, ``dqrelo``, ``svd``,
``deltacome``, ``lillama``; decided by :func:`supports_refinement`, not by a list of names) gets two kinds
of multipliers: one per sign part, on its scale, and one per low-rank component (singular vector), on
column k of ``up``. :func:`refine_scales` keeps everything else frozen and fits the multipliers so that
the rebuilt model's next-token distributions match the fine-tune's on calibration windows: Adam on
``KL(fine-tune ‖ rebuilt)``, the fine-tune's logits computed once per batch without gradients. Each
multiplier is ``1 + m`` with ``m`` starting at 0, so one learning rate suits matrices whose scales differ
by orders of magnitude.

Where the multipliers land: a sign scale is its JSON float param; a component multiplier scales the
fp16 group scales of singular vector k of a quantized ``up`` (row k of ``up_scales``), or column k of a
float ``up``. Codes, signs, keys, dtypes and shapes are untouched, so the delta's bytes are identical in
size (checked). The refined scales are kept only when the delta as stored (after the fp16 rounding of the
rescaled group scales) lowers the KL on the evaluation windows; otherwise the data-free ones stay
(``stats.scale_refinement.applied`` says which). A non-finite loss or multiplier is refused.

Memory: the fine-tune model in fp32 on ``device`` plus, per refined matrix, the base in fp32, its signs as
int8 and its fp32 factors; the batch's logits twice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call

from deltakit.codecs.base import (
    Budget,
    Calibration,
    Codec,
    CodecConfig,
    EncodeContext,
    Encoded,
    FactoredView,
)
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
from deltakit.ops.threads import one_thread_on_cpu, torch_threads

#: where the report lands in the manifest's stats
STATS_KEY = "scale_refinement"
#: windows on which the KL is measured before and after (at least one batch)
EVAL_WINDOWS = 8


#: learning rates of the fit when none is given (:func:`default_lr`): the larger one up to
#: ``MANY_MULTIPLIERS`` multipliers per refined matrix, the smaller one above. Measured on the SmolLM2
#: fleet means (docs/rate_distortion/scale_refinement/README.md): 0.1 wins at 28 and 54 multipliers per
#: matrix (deltacome at 0.25 and 0.5 bits/weight, every variant), 0.05 at 101 (deltacome at 1 bit/weight,
#: 5 of 6 variants); at 71 (svd, 4-bit factors, 1 bit/weight) the two are level (0.9928 both), so that
#: case keeps 0.1. bitdelta (1 per matrix) does better with 0.1 on shakespeare (0.9929 against 0.988).
LR_FEW, LR_MANY = 0.1, 0.05
MANY_MULTIPLIERS = 80


def default_lr(multipliers: int, matrices: int) -> float:
    """The fit's learning rate when ``refine_lr`` is not given: LR_FEW for at most MANY_MULTIPLIERS
    multipliers (sign scales plus low-rank components) per refined matrix on average, else LR_MANY.
    With many multipliers each Adam step moves the rebuilt weights further, and the larger rate
    overshoots."""
    return LR_MANY if multipliers > MANY_MULTIPLIERS * max(matrices, 1) else LR_FEW


@dataclass(frozen=True)
class RefineSettings:
    """Adam steps, learning rate (relative to each data-free scale; None: :func:`default_lr`), windows
    per step and the seed that orders the minibatches (defaults: :class:`~deltakit.core.options.
    CompressOptions`' ``refine_*``)."""

    steps: int
    lr: float | None
    batch_size: int
    seed: int = 0

    def validate(self) -> None:
        for key in ("steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                name = "refine_batch" if key == "batch_size" else f"refine_{key}"
                raise UsageError(f"{name}={value!r} is not valid: give an integer >= 1")
        if self.lr is not None and (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, int | float)
            or not (math.isfinite(self.lr) and self.lr > 0)
        ):
            raise UsageError(f"refine_lr={self.lr!r} is not valid: give a finite number > 0")


def _refinable_view(codec: Codec, encoded: Encoded) -> FactoredView | None:
    """``encoded``'s factored view when ``codec.rescaled`` can rescale its parts, else None."""
    view = codec.factored(encoded)
    if view is None or len(view.shape) != 2:
        return None
    components = torch.ones(view.rank) if view.has_low_rank else None
    scale = view.scale if view.signs is not None else None
    return view if codec.rescaled(encoded, scale, components) is not None else None


def supports_refinement(codec: Codec, config: CodecConfig | None = None) -> bool:
    """Whether ``codec`` can rescale the parts of its factored view: encodes a seeded 32×32 probe (at its
    default budget) and asks :meth:`~deltakit.codecs.base.Codec.rescaled`."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(32, 32, generator=generator)
    target = base + 0.1 * torch.randn(32, 32, generator=generator)
    cfg = config if config is not None else codec.config_class()
    ctx = EncodeContext(budget=Budget(ratio=codec.default_ratio), name="probe")
    try:
        with torch_threads(1):
            return _refinable_view(codec, codec.encode(base, target, cfg, ctx)) is not None
    except (DeltakitError, TypeError, ValueError, KeyError, RuntimeError, AttributeError):
        return False


def refinable_codecs() -> list[str]:
    """Names of the registered codecs :func:`supports_refinement` accepts."""
    return [name for name in list_codecs() if supports_refinement(get_codec(name))]


def check_refinable(codec: Codec, config: CodecConfig) -> None:
    """Refuse a codec whose parts cannot be rescaled, naming the ones whose parts can."""
    if not supports_refinement(codec, config):
        names = ", ".join(refinable_codecs()) or "none registered"
        raise UsageError(
            f"refine_scales=True fits the scales of a sign part or of low-rank components; {codec.name} "
            f"has neither (codecs that have them: {names})"
        )


@dataclass
class _Part:
    """One refinable matrix: ``W = fixed + scale₀·(1 + m)·S + up·diag(1 + g)·down``.

    fixed: full tensor shape, fp32 (the base, plus exactly stored grown rows). signs: int8 ±1 (rows, cols)
    of the encoded rows, or None. up (rows, r), down (r, cols): fp32 view factors, or None. ``m`` is entry
    ``sign_index`` of the student's sign multipliers, ``g`` the slice ``[offset, offset + r)`` of its
    component multipliers.
    """

    name: str
    fixed: torch.Tensor
    signs: torch.Tensor | None
    scale0: float
    up: torch.Tensor | None
    down: torch.Tensor | None
    sign_index: int = -1
    offset: int = 0

    @property
    def rank(self) -> int:
        return 0 if self.up is None else int(self.up.shape[1])


class _Student:
    """The rebuilt model's encoded matrices, their sign scales and low-rank components trainable as
    multipliers ``(1 + m)`` ((n_signs,) fp32) and ``(1 + g)`` ((n_components,) fp32), both starting at 1;
    encoded matrices with no factored view are held fixed."""

    def __init__(self, device: torch.device):
        self.parts: list[_Part] = []
        self.fixed: dict[str, torch.Tensor] = {}  # non-refinable encoded matrices, full shape, fp32
        self.device = device
        self.m = torch.zeros(0)
        self.g = torch.zeros(0)
        self.n_signs = 0
        self.n_components = 0

    @property
    def scale0(self) -> list[float]:
        return [p.scale0 for p in self.parts]

    def add(self, part: _Part) -> None:
        part.fixed = part.fixed.to(self.device)
        if part.signs is not None:
            part.signs, part.sign_index = part.signs.to(self.device), self.n_signs
            self.n_signs += 1
        if part.up is not None:
            part.up, part.down = part.up.to(self.device), part.down.to(self.device)
            part.offset = self.n_components
            self.n_components += part.rank
        self.parts.append(part)

    def start(self) -> None:
        self.m = torch.zeros(self.n_signs, device=self.device, requires_grad=True)
        self.g = torch.zeros(self.n_components, device=self.device, requires_grad=True)

    def sign_scales(self) -> list[float | None]:
        """Per part, its current sign scale (None without a sign part)."""
        m = self.m.detach().cpu().tolist()
        return [None if p.signs is None else p.scale0 * (1 + m[p.sign_index]) for p in self.parts]

    def components(self) -> list[torch.Tensor | None]:
        """Per part, its current (r,) fp32 component multipliers on the CPU (None without factors)."""
        g = 1 + self.g.detach().cpu()
        return [None if p.up is None else g[p.offset : p.offset + p.rank].clone() for p in self.parts]

    def weights(self) -> dict[str, torch.Tensor]:
        """Parameter overrides for :func:`torch.func.functional_call` (differentiable in ``m`` and ``g``)."""
        out = dict(self.fixed)
        for p in self.parts:
            w = p.fixed
            if p.signs is not None:
                w = w + _pad_rows(p.scale0 * (1 + self.m[p.sign_index]) * p.signs, w.shape[0])
            if p.up is not None:
                g = 1 + self.g[p.offset : p.offset + p.rank]
                w = w + _pad_rows((p.up * g) @ p.down, w.shape[0])  # (rows, r) (r, cols)
            out[p.name] = w
        return out


def _pad_rows(part: torch.Tensor, rows: int) -> torch.Tensor:
    """``part`` (encoded rows, cols) with zero rows appended up to ``rows`` (the grown rows stored exactly)."""
    extra = rows - part.shape[0]
    return part if extra == 0 else torch.cat([part, part.new_zeros(extra, part.shape[1])])


def _matrix_part(decoder: Decoder, name: str, base: torch.Tensor | None) -> tuple[_Part | None, torch.Tensor]:
    """(refinable part or None, fixed full-shape fp32 tensor) of encoded tensor ``name``."""
    entry = decoder.delta.entry(name)
    encoded = decoder.encoded(name)
    codec = decoder.codec
    base32 = decoder.check_base(name, entry, base).to(torch.float32)
    extra = decoder.delta.exact(name, "extra_rows").float() if entry.extra_rows is not None else None
    view = codec_call(name, lambda: _refinable_view(codec, encoded))
    if view is None:
        fixed = base32 + decoder.delta_fp32(name, base)
        return None, fixed if extra is None else torch.cat([fixed, extra])
    signs = None
    if view.signs is not None:
        signs = unpack_signs(view.signs, tuple(view.shape), "cpu").to(torch.int8)  # (rows, cols) ±1
    up = view.up.to(torch.float32) if view.has_low_rank else None  # (rows, r), dequantized if quantized
    down = view.down.to(torch.float32) if view.has_low_rank else None  # (r, cols)
    fixed = base32 if extra is None else torch.cat([base32, extra])
    return _Part(name, fixed, signs, float(view.scale), up, down), fixed


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
        part, fixed = _matrix_part(decoder, name, base.get(name) if name in base_names else None)
        if part is None:
            student.fixed[name] = fixed.to(device)
        else:
            student.add(part)
    student.start()
    return student


def _batch_kl(model: torch.nn.Module, weights: dict[str, torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """KL(fine-tune ‖ rebuilt) over every next-token distribution of ``batch`` (b, seq) int64."""
    with torch.no_grad():
        teacher = model(input_ids=batch, use_cache=False).logits  # (b, seq, vocab)
    student = functional_call(model, weights, args=(), kwargs={"input_ids": batch, "use_cache": False})
    return logit_kl(student.logits, teacher)


def _mean_kl(
    model, weights: dict[str, torch.Tensor], windows: torch.Tensor, batch_size: int, device
) -> float:
    """Token-weighted mean KL over ``windows`` (n, seq) with the encoded matrices set to ``weights``."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch_size):
            batch = windows[start : start + batch_size].to(device)
            total += float(_batch_kl(model, weights, batch)) * batch.shape[0]
    return total / windows.shape[0]


def _fit(model, student: _Student, windows: torch.Tensor, settings: RefineSettings, progress) -> None:
    """``settings.steps`` Adam steps on minibatches of ``windows`` in a seeded order (cycled as needed);
    ``settings.lr`` must be set (:func:`refine_scales` sets it)."""
    if settings.lr is None:
        raise ValueError("_fit needs a learning rate; refine_scales picks default_lr when none is given")
    optimizer = torch.optim.Adam([student.m, student.g], lr=settings.lr)
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
    """Fit the sign scales and low-rank component scales of ``delta``'s matrices on ``windows``; returns
    the report.

    delta: in memory when any matrix has low-rank components (their stored scales are rewritten), else in
    memory or read back. base: the base model's tensors. model_dir: the fine-tune's checkpoint directory
    (its model is the teacher and, with the encoded matrices replaced, the student). windows: (n, seq)
    int64 calibration tokens. When the stored result lowers the KL, mutates ``delta``: each refinable
    matrix's ``params`` and stored tensors become those of ``codec.rescaled`` (same keys, dtypes and
    shapes); in every case ``stats["scale_refinement"]`` gets the report. On the CPU it runs on one
    thread, so the result does not depend on the thread count.
    """
    settings.validate()
    codec = Decoder.of(delta).codec
    before_sizes = _footprint(delta.manifest)
    with one_thread_on_cpu(device):
        model = quiet_load(Path(model_dir)).to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        student = _student(delta, codec, base, model, device)
        if not student.parts:
            raise UsageError(f"refine_scales: no encoded matrix of this {codec.name} delta has a scale")
        if student.n_components and not delta.in_memory:
            raise UsageError(
                "refine_scales: low-rank component scales are rewritten; give an in-memory delta"
            )
        lr_default = settings.lr is None
        if lr_default:
            lr = default_lr(student.n_signs + student.n_components, len(student.parts))
            settings = dataclasses.replace(settings, lr=lr)
        held = windows[: max(EVAL_WINDOWS, settings.batch_size)]
        kl_before = _mean_kl(model, student.weights(), held, settings.batch_size, device)
        _fit(model, student, windows, settings, progress)
        rescaled = _rescaled(delta, codec, student)
        kl_fitted = _mean_kl(
            model, _stored_weights(codec, student, rescaled), held, settings.batch_size, device
        )
    report = _write_scales(delta, student, rescaled, kl_before, kl_fitted)
    report.update(
        steps=settings.steps, lr=settings.lr, lr_default=lr_default, batch_size=settings.batch_size,
        seed=settings.seed,
        windows=int(windows.shape[0]), seq_len=int(windows.shape[1]), tokens=int(windows.numel()),
        eval_windows=int(held.shape[0]),
    )  # fmt: skip
    delta.manifest.stats[STATS_KEY] = report
    if _footprint(delta.manifest) != before_sizes:
        raise AssertionError("refine_scales changed more than the scales of the delta")
    return report


def _rescaled(delta: Delta, codec: Codec, student: _Student) -> list[tuple[Encoded, Encoded]]:
    """Per student part, (its encoding, its encoding with the fitted scales: what would be stored);
    refuses non-finite multipliers before anything is rescaled."""
    decoder = Decoder(delta, codec)
    scales, components = student.sign_scales(), student.components()
    for part, scale, comps in zip(student.parts, scales, components, strict=True):
        if (scale is not None and not math.isfinite(scale)) or (
            comps is not None and not bool(torch.isfinite(comps).all())
        ):
            raise NonFiniteError(
                f"refine_scales: the fitted scale of {part.name} is NaN or Inf; lower refine_lr="
            )
    out = []
    for part, scale, comps in zip(student.parts, scales, components, strict=True):
        encoded = decoder.encoded(part.name)
        new = codec_call(part.name, lambda e=encoded, s=scale, c=comps: codec.rescaled(e, s, c))
        out.append((encoded, new))
    return out


def _stored_weights(
    codec: Codec, student: _Student, rescaled: list[tuple[Encoded, Encoded]]
) -> dict[str, torch.Tensor]:
    """The encoded matrices as the rescaled encodings rebuild them (fp32, full shape)."""
    out = dict(student.fixed)
    with torch.no_grad():
        for part, (_, encoded) in zip(student.parts, rescaled, strict=True):
            delta = codec_call(part.name, lambda e=encoded: codec.decode(e, student.device))
            out[part.name] = part.fixed + _pad_rows(delta, part.fixed.shape[0])
    return out


def _write_scales(
    delta: Delta,
    student: _Student,
    rescaled: list[tuple[Encoded, Encoded]],
    kl_before: float,
    kl_fitted: float,
) -> dict[str, Any]:
    """Store the rescaled encodings when their KL is below the data-free one; the report's core."""
    if not math.isfinite(kl_fitted):
        raise NonFiniteError("refine_scales: the fitted model's KL is NaN or Inf; lower refine_lr=")
    applied = kl_fitted < kl_before
    if applied:
        for part, (old, encoded) in zip(student.parts, rescaled, strict=True):
            entry = delta.manifest.tensors[part.name]
            for local, tensor in encoded.tensors.items():
                if tensor is not old.tensors[local]:
                    delta.replace_stored(entry.stored[local], tensor)
            entry.params = dict(encoded.params)
    multipliers = [
        abs(s / s0 - 1)
        for s, s0 in zip(student.sign_scales(), student.scale0, strict=True)
        if s is not None and s0
    ]
    multipliers += [float((c - 1).abs().max()) for c in student.components() if c is not None and c.numel()]
    return {
        "tensors": len(student.parts),
        "sign_scales": student.n_signs,
        "components": student.n_components,
        "kl_before": kl_before,
        "kl_fitted": kl_fitted,
        "kl_after": kl_fitted if applied else kl_before,
        "applied": applied,
        "max_relative_change": max(multipliers, default=0.0),
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
