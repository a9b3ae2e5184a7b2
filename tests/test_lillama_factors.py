"""lillama delta mode with quantized factors (``factor_bits`` < 16) and lillama deltas written before the field.

Tiny random Llama models with a byte-level tokenizer saved beside them (tests/lillama_helpers.py).
"""

from __future__ import annotations

import pytest
import torch
from lillama_helpers import make_finetune, make_llama, write_text
from manifest_support import copy_without_config_fields

import deltakit
from deltakit.codecs._common import QUANT_NAMES
from deltakit.codecs.base import FP16_BYTES, Encoded
from deltakit.core.decode import Decoder
from deltakit.errors import FormatError
from deltakit.format.manifest import ENCODED
from deltakit.models.checkpoint import open_checkpoint
from deltakit.ops.lowrank import low_rank_product
from deltakit.ops.quant import QuantizedTensor, dequantize

RATIO = 1 / 4
Q_NAME = "model.layers.0.self_attn.q_proj.weight"  # a distilled block Linear


def _compress(tiny, out, seed: int = 7, **overrides):
    return deltakit.compress(
        tiny["base"],
        tiny["ft"],
        out,
        method="lillama",
        ratio=RATIO,
        data=[tiny["text"]],
        tokens=512,
        seq_len=32,
        seed=seed,
        overrides={"batch_size": "4", **overrides},
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lillama-factors")
    base = make_llama(root / "base", layers=2)
    info = {"root": root, "base": base, "ft": make_finetune(base, root / "ft")}
    info["text"] = write_text(root / "cal.txt", 40)
    info["q4"] = _compress(info, root / "q4", factor_bits="4")
    return info


def _stored_bytes(delta, name: str) -> int:
    entry = delta.manifest.tensors[name]
    tensors = [delta.stored_tensor(key, entry.shard) for key in entry.stored.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_quantized_factors_are_stored_and_counted_exactly(tiny):
    delta = tiny["q4"]
    config = Decoder.of(delta).codec.config_class.from_stored(delta.manifest.codec.config).svd_config()
    assert config.factor_bits == 4 and config.factor_group == 64
    encoded = {n: e for n, e in delta.manifest.tensors.items() if e.kind == ENCODED}
    assert Q_NAME in encoded
    total = 0
    for name, entry in encoded.items():
        rows, cols = entry.shape
        rank = entry.params["rank"]
        assert set(entry.stored) == set(QUANT_NAMES), name
        assert entry.params["factors"]["up"]["bits"] == 4 and entry.params["factors"]["down"]["bits"] == 4
        stored = _stored_bytes(delta, name)
        assert stored == config.pair_nbytes(rows, cols, rank), name
        # the rank is the largest whose exact quantized bytes fit the matrix's budget
        budget = RATIO * FP16_BYTES * rows * cols
        assert stored <= budget
        assert rank == min(rows, cols) or config.pair_nbytes(rows, cols, rank + 1) > budget
        total += stored
    assert delta.manifest.stats["encoded_bytes"] == total


def test_quantized_ranks_match_svd_at_the_same_factor_bits(tiny, tmp_path):
    svd = deltakit.compress(
        tiny["base"], tiny["ft"], tmp_path / "svd", method="svd", ratio=RATIO, overrides={"factor_bits": "4"}
    )
    ours = tiny["q4"].manifest.tensors
    for name, entry in svd.manifest.tensors.items():
        if entry.kind == ENCODED:
            assert ours[name].params["rank"] == entry.params["rank"], name
    assert tiny["q4"].manifest.stats["encoded_bytes"] == svd.manifest.stats["encoded_bytes"]
    # same layout, different (distilled) factors
    q_ours = tiny["q4"].stored_tensor(ours[Q_NAME].stored["down_codes"], ours[Q_NAME].shard)
    entry = svd.manifest.tensors[Q_NAME]
    assert not torch.equal(q_ours, svd.stored_tensor(entry.stored["down_codes"], entry.shard))


def test_apply_equals_the_dequantized_stored_factors(tiny, tmp_path):
    delta = tiny["q4"]
    deltakit.apply(tiny["base"], delta.path, tmp_path / "applied")
    rebuilt, base = open_checkpoint(tmp_path / "applied"), open_checkpoint(tiny["base"])
    decoder = Decoder.of(delta)
    for name, entry in delta.manifest.tensors.items():
        if entry.kind != ENCODED:
            continue
        stored = decoder.delta.codec_tensors(name)
        meta = entry.params["factors"]
        up = dequantize(QuantizedTensor.from_tensors(stored, meta["up"], "up_"))  # (out, r)
        down = dequantize(QuantizedTensor.from_tensors(stored, meta["down"], "down_"))  # (r, in)
        expected = (base.get(name).float() + low_rank_product(up, down)).to(base.get(name).dtype)
        assert torch.equal(rebuilt.get(name), expected), name
        view = decoder.codec.factored(decoder.encoded(name))
        assert view.signs is None and torch.equal(view.up @ view.down, up @ down)


def test_quantized_delta_mode_is_deterministic_under_a_seed(tiny, tmp_path):
    again = _compress(tiny, tmp_path / "again", factor_bits="4")
    assert again.manifest.files == tiny["q4"].manifest.files  # same sha256 for every shard
    assert again.manifest.tensors == tiny["q4"].manifest.tensors


def test_quantized_lillama_delta_runs_in_the_mixed_batch(tiny):
    from deltakit.runtime import HotSwapRuntime, MultiDeltaExecutor
    from deltakit.runtime.prepared import prepare_delta

    prepared = prepare_delta("q4", tiny["q4"], resolve=lambda name: name)
    assert prepared.factored  # the low-rank path, from the svd view of the quantized factors
    assert all(op.view.up is not None for op in prepared.ops.values() if op.kind == ENCODED)
    rt = HotSwapRuntime.from_pretrained(tiny["base"])
    rt.add_delta("q4", tiny["q4"].path)
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(3))
    assignment = ["q4", None, "q4"]
    with torch.no_grad():
        with MultiDeltaExecutor(rt, sign_cache_bytes=0).assign(assignment):
            mixed = rt.model(ids).logits  # (batch, seq, vocab)
        for row, name in enumerate(assignment):
            rt.activate(name)
            merged = rt.model(ids[row : row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], merged, rtol=1e-4, atol=1e-4)


def test_lillama_delta_without_factor_fields_decodes_bit_exactly(tiny, tmp_path):
    """A lillama delta whose config predates factor_bits/factor_group/factor_rounding holds fp16 factors."""
    fp16 = _compress(tiny, tmp_path / "fp16")
    entry = fp16.manifest.tensors[Q_NAME]
    assert set(entry.stored) == {"up", "down"} and "factors" not in entry.params
    old = copy_without_config_fields(fp16.path, tmp_path / "old")
    loaded = deltakit.load_delta(old)
    assert "factor_bits" not in loaded.manifest.codec.config
    now = deltakit.apply(tiny["base"], fp16.path).state_dict
    then = deltakit.apply(tiny["base"], old).state_dict
    assert now.keys() == then.keys() and all(torch.equal(now[k], then[k]) for k in now)


def test_tampered_quantized_lillama_factors_are_format_errors(tiny):
    decoder = Decoder.of(tiny["q4"])
    codec, encoded = decoder.codec, decoder.encoded(Q_NAME)
    factors = encoded.params["factors"]
    wrong = {**encoded.params, "factors": {**factors, "up": {**factors["up"], "shape": [7, 3]}}}
    with pytest.raises(FormatError):
        codec.decode(Encoded(encoded.tensors, wrong))
    short = {**encoded.tensors, "down_codes": encoded.tensors["down_codes"][:-1]}
    with pytest.raises(FormatError):
        codec.decode(Encoded(short, encoded.params))
