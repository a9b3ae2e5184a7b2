"""Tiny Llama checkpoints with a byte-level tokenizer saved beside them (no hub), for the lillama tests."""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
    "To be or not to be, that is the question. All that glitters is not gold. "
)


def byte_tokenizer():
    """A 256-symbol byte-level BPE tokenizer with no merges, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def make_llama(
    path: Path,
    *,
    layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
) -> Path:
    """Save a random tiny Llama (vocab 256) and the byte tokenizer in ``path``."""
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    model = tf.LlamaForCausalLM(config)
    model.to(dtype).save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return Path(path)


def make_finetune(base: Path, path: Path, *, seed: int = 1, scale: float = 0.3) -> Path:
    """A fine-tuned twin of ``base``: every 2-D weight moved by a low-rank plus dense perturbation."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                rows, cols = p.shape
                low = torch.randn(rows, 4, generator=g) @ torch.randn(4, cols, generator=g) / 2
                p.add_(scale * p.std() * (low + 0.3 * torch.randn(rows, cols, generator=g)))
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return Path(path)


def write_text(path: Path, repeats: int = 60) -> Path:
    """A calibration text file of about ``repeats × 190`` bytes (= tokens for the byte tokenizer)."""
    g = torch.Generator().manual_seed(3)
    words = TEXT.split()
    lines = [
        " ".join(words[int(i)] for i in torch.randint(0, len(words), (30,), generator=g))
        for _ in range(repeats)
    ]
    path.write_text("\n".join(lines))
    return path
