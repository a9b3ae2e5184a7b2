"""Helpers for the runtime and server tests: a tiny tied-embedding Llama, a byte tokenizer, deltas.

Everything is built locally (no hub). Collected by pytest but holds no tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_BYTES = 256
SPECIALS = ("<pad>", "<eos>")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + <pad>, <eos>) wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_llama(dtype: torch.dtype = torch.float32, seed: int = 0, tied: bool = True):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_BYTES + len(SPECIALS),
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=VOCAB_BYTES,
        eos_token_id=VOCAB_BYTES + 1,
        bos_token_id=None,
    )
    model = tf.LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # larger weights so that different deltas give different greedy outputs
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(8.0)
    return model


def build_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB_BYTES + len(SPECIALS),
        n_positions=256,
        eos_token_id=VOCAB_BYTES + 1,
        bos_token_id=VOCAB_BYTES + 1,
    )
    return tf.GPT2LMHeadModel(config).to(dtype)


def save_model(model, path: Path) -> Path:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def finetune(base_dir: Path, out: Path, seed: int, scale: float = 0.3, touch_vectors: bool = True) -> Path:
    """A fine-tuned twin: every matrix moves by a sign + low-rank perturbation, vectors slightly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.ndim == 2:
                rows, cols = p.shape
                low = torch.randn(rows, 2, generator=g) @ torch.randn(2, cols, generator=g)
                signs = torch.randint(0, 2, p.shape, generator=g).float() * 2 - 1
                p.add_((scale * (low + signs) * p.float().abs().mean()).to(p.dtype))
            elif touch_vectors:
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return save_model(model, out)


def make_fleet(
    root: Path,
    *,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    methods: tuple[str, ...] = ("dqrelo", "bitdelta", "svd"),
) -> dict:
    """Base dir plus one fine-tune and one compressed delta per method: {"base", "ft": {...}, "delta": {...}}."""
    import deltakit

    root.mkdir(parents=True, exist_ok=True)
    model = build_llama(dtype) if arch == "llama" else build_gpt2(dtype)
    base = save_model(model, root / "base")
    fleet: dict = {"base": base, "ft": {}, "delta": {}}
    for i, method in enumerate(methods):
        name = f"{method}-{i}"
        ft = finetune(base, root / f"ft-{name}", seed=100 + i)
        fleet["ft"][name] = ft
        kwargs = {"rank": 4} if method in ("dqrelo", "svd") else {}
        deltakit.compress(base, ft, root / f"delta-{name}", method=method, **kwargs)
        fleet["delta"][name] = root / f"delta-{name}"
    return fleet


def applied_model(base_dir: Path, delta_dir: Path, out: Path):
    """The model `deltakit.apply` writes, loaded back (the reference for bit-exactness)."""
    from transformers import AutoModelForCausalLM

    import deltakit

    if not out.exists():
        deltakit.apply(base_dir, delta_dir, out)
    return AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()


_FLEETS: dict[str, dict] = {}


def cached_fleet(kind: str = "llama") -> dict:
    """Fleets built once per test session (in a temporary directory), shared by the test modules.

    kinds: ``llama`` (fp32, tied embeddings; dqrelo, bitdelta, svd and lossless deltas), ``llama-bf16``
    (dqrelo, bitdelta, svd), ``gpt2`` (fp32, Conv1D; dqrelo, svd).
    """
    import tempfile

    if kind not in _FLEETS:
        root = Path(tempfile.mkdtemp(prefix=f"deltakit-rt-{kind}-"))
        if kind == "llama":
            fleet = make_fleet(root, methods=("dqrelo", "bitdelta", "svd", "lossless"))
        elif kind == "llama-bf16":
            fleet = make_fleet(root, dtype=torch.bfloat16, methods=("dqrelo", "bitdelta", "svd"))
        elif kind == "gpt2":
            fleet = make_fleet(root, arch="gpt2", methods=("dqrelo", "svd"))
        else:
            raise ValueError(kind)
        fleet["root"] = root
        _FLEETS[kind] = fleet
    return _FLEETS[kind]


def foreign_delta(root: Path) -> Path:
    """A delta made from a different base (another random init): its base fingerprint differs."""
    import deltakit

    out = root / "foreign-delta"
    if not out.exists():
        other = save_model(build_llama(seed=1), root / "foreign-base")
        ft = finetune(other, root / "foreign-ft", seed=5)
        deltakit.compress(other, ft, out, method="bitdelta")
    return out


def reference_generate(model, tokenizer, prompt: str, max_tokens: int) -> str:
    """Greedy continuation with transformers' own generate (the reference for server outputs)."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
