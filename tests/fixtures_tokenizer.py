"""A character-level tokenizer built locally (no hub): one token per printable ASCII character.

Ids fit the tiny fixture models' vocabulary (256): printable ASCII 32..126, then ``<unk>`` and ``</s>``.
"""

from __future__ import annotations

from pathlib import Path


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast`` that maps each printable ASCII character to its own id."""
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


def save_char_tokenizer(model_dir: Path) -> Path:
    """Save the character tokenizer next to a checkpoint; returns ``model_dir``."""
    build_char_tokenizer().save_pretrained(str(model_dir))
    return Path(model_dir)
