"""Tiny models and structured synthetic deltas for the tests (no hub access, everything built locally).

Models: Llama (untied lm_head), Qwen2 (q/k/v biases), GPT-2 (Conv1D weights stored (in, out); wte tied
to lm_head), all hidden 64, 2 layers, vocab 256, saved with ``save_pretrained`` as safetensors.

Fine-tuned twins are made by adding a *structured* perturbation to each 2-D weight: a low-rank part,
a sign part (a random ±1 matrix times a small magnitude: full rank, so low-rank codecs cannot capture
it), a sparse part and dense noise. Vectors (norms, biases) move slightly.
"""

from __future__ import annotations

from pathlib import Path

import torch

HIDDEN, LAYERS, VOCAB, HEADS = 64, 2, 256, 4
ARCHS = ("llama", "qwen2", "gpt2")


#: config fields shared by the Llama-style fixtures (Llama, Qwen2)
_DECODER_FIELDS = dict(
    hidden_size=HIDDEN,
    intermediate_size=2 * HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def build_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``arch`` (fp32, CPU)."""
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        config = tf.LlamaConfig(**_DECODER_FIELDS)
        return tf.LlamaForCausalLM(config)
    if arch == "qwen2":
        config = tf.Qwen2Config(**_DECODER_FIELDS)
        return tf.Qwen2ForCausalLM(config)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB, n_positions=128)
        return tf.GPT2LMHeadModel(config)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def structured_delta(
    rows: int,
    cols: int,
    generator: torch.Generator,
    *,
    rank: int = 8,
    lowrank: float = 0.4,
    sign: float = 0.2,
    sparse: float = 0.1,
    dense: float = 0.3,
    heavy_tail_df: float | None = None,
    sparse_fraction: float = 0.01,
) -> torch.Tensor:
    """An fp32 (rows, cols) matrix with unit RMS made of components with the given energy shares.

    lowrank: rank-``rank`` product with a decaying spectrum; sign: random ±1 matrix (full rank);
    sparse: ``sparse_fraction`` of the entries, Gaussian; dense: Gaussian noise, or Student-t with
    ``heavy_tail_df`` degrees of freedom (heavy-tailed, like real fine-tuning deltas).
    The shares are fractions of the squared Frobenius norm (they need not sum to one).
    """
    parts: list[tuple[torch.Tensor, float]] = []
    if lowrank > 0:
        r = min(rank, rows, cols)
        u = torch.linalg.qr(torch.randn(rows, r, generator=generator))[0]  # (rows, r)
        v = torch.linalg.qr(torch.randn(cols, r, generator=generator))[0]  # (cols, r)
        spectrum = torch.exp(-torch.arange(r, dtype=torch.float32) / max(1.0, r / 4))
        parts.append(((u * spectrum) @ v.T, lowrank))
    if sign > 0:
        parts.append((torch.randint(0, 2, (rows, cols), generator=generator).float() * 2 - 1, sign))
    if sparse > 0:
        flat = torch.zeros(rows * cols)
        count = max(1, int(sparse_fraction * rows * cols))
        idx = torch.randperm(rows * cols, generator=generator)[:count]
        flat[idx] = torch.randn(count, generator=generator)
        parts.append((flat.reshape(rows, cols), sparse))
    if dense > 0:
        noise = torch.randn(rows, cols, generator=generator)
        if heavy_tail_df is not None:
            # Student-t = normal / sqrt(chi2_df / df); chi2 from a sum of squared normals keeps the generator
            df = int(heavy_tail_df)
            chi2 = torch.randn(df, rows, cols, generator=generator).pow(2).sum(0)
            noise = noise / (chi2 / df).sqrt()
        parts.append((noise, dense))
    out = sum(p / p.norm() * share**0.5 for p, share in parts)
    return out / out.pow(2).mean().sqrt()


def perturb_model_(
    model: torch.nn.Module, seed: int, *, scale: float = 0.1, keep_embeddings: bool = False
) -> None:
    """Fine-tune ``model`` in place by a structured perturbation (any dtype; computed in fp32).

    2-D weights get ``scale * std(W) * structured_delta``; vectors move by ``scale * 0.1`` relative noise.
    keep_embeddings: leave embedding tables (and a tied lm_head) bit-identical.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if keep_embeddings and ("embed" in name or "wte" in name or "wpe" in name):
                continue
            w = param.detach().float()
            if w.ndim == 2:
                step = scale * w.std().clamp_min(1e-3) * structured_delta(*w.shape, generator)
            else:
                step = scale * 0.1 * (w.abs().mean() + 1e-2) * torch.randn(w.shape, generator=generator)
            param.copy_((w + step).to(param.dtype))


def save_model(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.bfloat16, **kwargs) -> Path:
    """``save_pretrained`` in ``dtype`` (safetensors); kwargs go to save_pretrained (max_shard_size...)."""
    model.to(dtype).save_pretrained(str(path), **kwargs)
    return Path(path)


def make_pair(
    root: Path,
    arch: str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    seed: int = 0,
    keep_embeddings: bool = False,
    max_shard_size: str | None = None,
) -> tuple[Path, Path]:
    """Save a base model and its fine-tuned twin under ``root``; returns (base_dir, target_dir)."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model = build_model(arch, seed)
    base = save_model(model, root / f"{arch}-base", dtype, **kwargs)
    perturb_model_(model, seed + 1000, keep_embeddings=keep_embeddings)
    target = save_model(model, root / f"{arch}-ft", dtype, **kwargs)
    return base, target


def make_resized_twin(
    base_model_arch: str, root: Path, *, extra_rows: int = 16, seed: int = 0
) -> tuple[Path, Path]:
    """A base and a fine-tune whose vocabulary grew by ``extra_rows`` (more embedding and lm_head rows)."""
    model = build_model(base_model_arch, seed)
    base = save_model(model, root / f"{base_model_arch}-base-resize", torch.bfloat16)
    perturb_model_(model, seed + 2000)
    model.resize_token_embeddings(VOCAB + extra_rows)
    with torch.no_grad():  # make the new rows distinctive so a lost row cannot pass by accident
        generator = torch.Generator().manual_seed(seed + 3000)
        emb = model.get_input_embeddings().weight
        emb[VOCAB:] = torch.randn(extra_rows, emb.shape[1], generator=generator).to(emb.dtype)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head[VOCAB:] = torch.randn(extra_rows, head.shape[1], generator=generator).to(head.dtype)
    target = save_model(model, root / f"{base_model_arch}-ft-resize", torch.bfloat16)
    return base, target


def save_bin_checkpoint(model_dir: Path, out_dir: Path) -> Path:
    """Copy a safetensors checkpoint as ``pytorch_model.bin`` (a plain torch.save of the state dict)."""
    import shutil

    from safetensors.torch import load_file

    out_dir.mkdir(parents=True)
    state = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(file)))
    torch.save(state, out_dir / "pytorch_model.bin")
    for extra in ("config.json", "generation_config.json"):
        if (Path(model_dir) / extra).exists():
            shutil.copyfile(Path(model_dir) / extra, out_dir / extra)
    return out_dir


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (through deltakit's own reader)."""
    from deltakit.models.checkpoint import open_checkpoint

    reader = open_checkpoint(model_dir)
    return {name: reader.get(name).clone() for name in reader.names()}


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Relative Frobenius error ||approx − exact|| / ||exact|| in fp64."""
    exact64 = exact.double()
    return float((approx.double() - exact64).norm() / exact64.norm().clamp_min(1e-30))
