"""Tensor roles inferred from names/shapes, and lazy checkpoint reading/writing in every layout."""

from __future__ import annotations

import json

import fixtures_models as fm
import pytest
import torch

from deltakit.errors import FormatError, TensorMismatchError
from deltakit.format.fingerprint import checkpoint_fingerprint, fingerprint_tensors
from deltakit.format.safetensors_io import TensorSpec, read_header
from deltakit.models.checkpoint import (
    SAFETENSORS_INDEX,
    CheckpointReader,
    CheckpointWriter,
    open_checkpoint,
    plan_shards,
)
from deltakit.models.roles import infer_roles


def roles_of(model_dir):
    reader = CheckpointReader(model_dir)
    return infer_roles({n: reader.spec(n) for n in reader.names()})


def test_llama_roles_and_untied_lm_head(llama_pair):
    roles = roles_of(llama_pair[0])
    assert roles["lm_head.weight"].role == "lm_head"
    assert roles["model.embed_tokens.weight"].role == "embedding"
    assert roles["model.norm.weight"].role == "norm"
    q = roles["model.layers.1.self_attn.q_proj.weight"]
    assert (q.role, q.block, q.layout) == ("linear", 1, "out_in")
    assert roles["model.layers.0.mlp.down_proj.weight"].layout == "out_in"
    assert roles["model.layers.0.input_layernorm.weight"].role == "norm"


def test_qwen2_qkv_biases_are_bias_role_and_weights_stay_out_in(qwen_pair):
    roles = roles_of(qwen_pair[0])
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert roles[f"model.layers.0.self_attn.{proj}.bias"].role == "bias"
        # k/v are (32, 64) with a bias of 32 = rows: nn.Linear layout
        assert roles[f"model.layers.0.self_attn.{proj}.weight"].layout == "out_in"


def test_gpt2_conv1d_weights_are_in_out_and_lm_head_is_tied(gpt2_pair):
    reader = CheckpointReader(gpt2_pair[0])
    assert "lm_head.weight" not in reader.names()  # tied to wte: saved once
    roles = roles_of(gpt2_pair[0])
    assert roles["transformer.h.0.attn.c_attn.weight"].layout == "in_out"  # (64, 192), bias 192
    assert roles["transformer.h.0.mlp.c_fc.weight"].layout == "in_out"  # (64, 256), bias 256
    assert roles["transformer.h.0.mlp.c_proj.weight"].layout == "in_out"  # (256, 64), bias 64
    assert roles["transformer.wte.weight"].role == "embedding"
    assert roles["transformer.wpe.weight"].role == "embedding"
    assert roles["transformer.h.1.ln_2.weight"].role == "norm"
    assert roles["transformer.h.1.ln_2.bias"].role == "bias"
    assert roles["transformer.ln_f.bias"].role == "bias"


def test_reader_specs_come_from_headers_and_match_loaded_tensors(llama_pair):
    reader = CheckpointReader(llama_pair[0])
    for name in reader.names():
        tensor = reader.get(name)
        spec = reader.spec(name)
        assert (tensor.dtype, tuple(tensor.shape)) == (spec.dtype, spec.shape) == (torch.bfloat16, spec.shape)
    assert [p.name for p in reader.aux_files()] == ["config.json", "generation_config.json"]


def test_sharded_checkpoint_reads_the_same_tensors_as_unsharded(sharded_pair, models_root):
    base_dir = sharded_pair[0]
    assert (base_dir / SAFETENSORS_INDEX).exists()
    assert len(list(base_dir.glob("*.safetensors"))) > 2
    whole = fm.save_model(fm.build_model("llama", 0), models_root / "sharded-whole")
    a, b = fm.load_state(base_dir), fm.load_state(whole)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint_fingerprint(base_dir) == checkpoint_fingerprint(whole)
    assert SAFETENSORS_INDEX not in [p.name for p in CheckpointReader(base_dir).aux_files()]


def test_bin_checkpoint_reads_through_weights_only_load(bin_pair, llama_pair, monkeypatch):
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    from_bin = fm.load_state(bin_pair[0])
    assert calls and all(c is True for c in calls)
    from_st = fm.load_state(llama_pair[0])
    assert from_bin.keys() == from_st.keys()
    assert all(torch.equal(from_bin[k], from_st[k]) for k in from_st)


def test_bin_with_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": torch.zeros(2), "evil": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FormatError, match="weights-only"):
        CheckpointReader(tmp_path)


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FormatError, match="not a model directory"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(FormatError, match="no model weights"):
        CheckpointReader(tmp_path)
    (tmp_path / SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"w": "model-00001.safetensors"}}))
    with pytest.raises(FormatError, match="missing shard"):
        CheckpointReader(tmp_path)


def test_unknown_tensor_raises_tensor_mismatch(llama_pair):
    reader = CheckpointReader(llama_pair[0])
    with pytest.raises(TensorMismatchError):
        reader.get("does.not.exist")
    with pytest.raises(TensorMismatchError):
        reader.spec("does.not.exist")


def test_open_checkpoint_accepts_dirs_dicts_and_sources(llama_pair):
    state = {"a": torch.ones(2)}
    src = open_checkpoint(state)
    assert src.names() == ["a"] and open_checkpoint(src) is src
    assert isinstance(open_checkpoint(str(llama_pair[0])), CheckpointReader)


def test_plan_shards_respects_limit_and_order():
    specs = [TensorSpec(f"t{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = plan_shards(specs, 80)  # 40, 40, 120, 20, 20 bytes
    assert [[s.name for s in shard] for shard in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 3000])
def test_checkpoint_writer_streams_and_reader_reads_back(tmp_path, max_shard_bytes):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(16, 32, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g),
        "c.idx": torch.arange(5, dtype=torch.int64),
        "d.weight": torch.randn(40, 20, generator=g, dtype=torch.float16),
    }
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = CheckpointWriter(tmp_path, specs, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    assert (tmp_path / SAFETENSORS_INDEX).exists() == (len(writer.shards) > 1)
    back = fm.load_state(tmp_path)
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    for file in tmp_path.glob("*.safetensors"):
        read_header(file)  # headers are valid safetensors


def test_checkpoint_writer_refuses_unplanned_or_misshaped_tensors(tmp_path):
    writer = CheckpointWriter(tmp_path, [TensorSpec("a", torch.float32, (3,))])
    with pytest.raises(TensorMismatchError):
        writer.write("b", torch.zeros(3))
    with pytest.raises(FormatError):
        writer.write("a", torch.zeros(4))


def test_fingerprint_is_order_independent_and_sensitive_to_name_dtype_shape_and_bytes():
    a = {"x": torch.arange(6, dtype=torch.float32), "y": torch.ones(2, 3)}
    reordered = {"y": a["y"], "x": a["x"]}
    assert fingerprint_tensors(a) == fingerprint_tensors(reordered)
    variants = [
        {"x": a["x"], "z": a["y"]},
        {"x": a["x"].to(torch.float64), "y": a["y"]},
        {"x": a["x"].reshape(2, 3), "y": a["y"]},
        {"x": a["x"] + torch.tensor([0, 0, 0, 0, 0, 1e-6]), "y": a["y"]},
    ]
    for variant in variants:
        assert fingerprint_tensors(variant) != fingerprint_tensors(a)


def test_safetensors_tensors_are_copy_on_write_views_of_the_file(tmp_path):
    """get() maps a checked safetensors file copy-on-write: the values are the file's, nothing is
    copied, and writing to a tensor changes neither the file nor a later read. A tensor whose bytes are
    not aligned for its dtype, and a file whose header does not tile its data, are copied out by
    safetensors instead, with the same values."""
    from safetensors.torch import load_file, save_file

    from deltakit.format.safetensors_io import StreamingSafetensorsWriter

    tensors = {
        "a": torch.arange(3, dtype=torch.bfloat16),  # 6 bytes: the next tensor starts unaligned for fp32
        "b": torch.randn(4, 5),
        "c": torch.zeros(0, 3),
        "d": torch.randn(2, 8).to(torch.bfloat16),
    }
    model = tmp_path / "m"
    model.mkdir()
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    with StreamingSafetensorsWriter(model / "model.safetensors", specs, digest=False) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    reader = CheckpointReader(model)
    for name, tensor in tensors.items():
        got = reader.get(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert reader._maps[model / "model.safetensors"] is not None  # mapped: the header checked out
    view = reader.get("d")
    view.fill_(7)  # private pages: the file keeps its bytes
    assert torch.equal(load_file(model / "model.safetensors")["d"], tensors["d"])
    assert torch.equal(CheckpointReader(model).get("d"), tensors["d"])

    other = tmp_path / "o"  # safetensors' own writer: read through the mapping or copied, same values
    other.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(other / "model.safetensors"))
    assert all(torch.equal(CheckpointReader(other).get(n), t) for n, t in tensors.items())
    raw = (other / "model.safetensors").read_bytes()  # a data section longer than the header says
    (other / "model.safetensors").write_bytes(raw + b"\0" * 8)
    padded = CheckpointReader(other)
    with pytest.raises(FormatError, match="cannot read tensor b"):  # not mapped; safetensors refuses it too
        padded.get("b")
    assert padded._maps[other / "model.safetensors"] is None
