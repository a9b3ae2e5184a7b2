"""Tiny local models for the examples' ``--tiny`` mode: a 2-layer Llama and fine-tuned twins, built offline.

The models are random (hidden 64, vocab 128) with a character-level tokenizer saved next to them, so
every example runs on a laptop CPU in seconds with nothing downloaded. A "fine-tune" is the base plus a
low-rank change and a little noise on every matrix, which is what real fine-tuning deltas look like.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # the examples print their own results only
hf_logging.set_verbosity_error()


def char_tokenizer():
    """A tokenizer with one token per printable ASCII character (ids 0..94), ``<unk>`` and ``</s>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab.update({"<unk>": len(vocab), "</s>": len(vocab) + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # decode without spaces between characters
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>"
    )


def _tiny_llama(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=96,
        bos_token_id=None,
        pad_token_id=96,
    )
    return tf.LlamaForCausalLM(config)


def build_base(out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny Llama (bf16 safetensors) and its tokenizer at ``out_dir``."""
    model = _tiny_llama(seed)
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    char_tokenizer().save_pretrained(str(out_dir))
    return Path(out_dir)


def build_finetune(base_dir: Path, out_dir: Path, seed: int, scale: float = 0.05) -> Path:
    """Save a twin of the base at ``out_dir``: each matrix moved by a rank-4 change plus small noise."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim != 2:
                continue
            rows, cols = param.shape
            low = torch.randn(rows, 4, generator=generator) @ torch.randn(4, cols, generator=generator) / 2
            noise = 0.1 * torch.randn(rows, cols, generator=generator)
            param.add_(scale * param.std() * (low + noise))
    model.to(torch.bfloat16).save_pretrained(str(out_dir))
    char_tokenizer().save_pretrained(str(out_dir))
    return Path(out_dir)


def build_fleet(root: Path, count: int) -> tuple[Path, list[Path]]:
    """A base and ``count`` fine-tunes under ``root``: (base_dir, [finetune dirs])."""
    base = build_base(Path(root) / "base")
    return base, [build_finetune(base, Path(root) / f"ft-{i}", seed=100 + i) for i in range(count)]


def pair_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the examples' shared ``--base``, ``--finetune`` and ``--tiny`` arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base", type=Path)
    parser.add_argument("--finetune", type=Path)
    parser.add_argument("--tiny", action="store_true", help="build tiny local models instead")
    return parser


def parse_pair(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parsed arguments; ``--base`` and ``--finetune`` are required unless ``--tiny`` is given."""
    args = parser.parse_args()
    if not args.tiny and (args.base is None or args.finetune is None):
        parser.error("give --base and --finetune, or --tiny")
    return args


def ensure_pair(args: argparse.Namespace, work: Path) -> None:
    """With ``--tiny``, build a tiny base and fine-tune under ``work`` and point ``args`` at them."""
    if args.tiny:
        args.base = build_base(work / "base")
        args.finetune = build_finetune(args.base, work / "finetune", seed=1)
