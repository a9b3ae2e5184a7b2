"""End-to-end compress -> apply on tiny Llama / Qwen2 / GPT-2 checkpoints in every on-disk layout."""

from __future__ import annotations

import json

import fixtures_models as fm
import pytest
import torch

import deltakit
from deltakit.errors import BaseMismatchError
from deltakit.format.fingerprint import checkpoint_fingerprint
from deltakit.format.manifest import Manifest
from deltakit.models.checkpoint import SAFETENSORS_INDEX, CheckpointReader

LOSSY = ["dqrelo", "svd", "bitdelta", "dare"]


def assert_bit_exact(out_dir, target_dir):
    out, target = fm.load_state(out_dir), fm.load_state(target_dir)
    assert out.keys() == target.keys()
    for name in target:
        assert out[name].dtype == target[name].dtype, name
        assert torch.equal(out[name], target[name]), name
    assert checkpoint_fingerprint(out_dir) == checkpoint_fingerprint(target_dir)


def test_lossless_reproduces_bf16_finetune_bit_for_bit(bf16_pair, tmp_path):
    base, target = bf16_pair
    delta = deltakit.compress(base, target, tmp_path / "delta", method="lossless")
    report = deltakit.apply(base, tmp_path / "delta", tmp_path / "out")
    assert report.matches_target
    assert report.output_fingerprint == delta.manifest.target.fingerprint
    assert_bit_exact(tmp_path / "out", target)
    # the bf16 delta compresses: smaller than the raw fine-tuned weights
    raw = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    assert delta.manifest.stats["stored_bytes"] < raw


def test_lossless_reproduces_fp32_finetune_bit_for_bit(fp32_pair, tmp_path):
    base, target = fp32_pair
    deltakit.compress(base, target, tmp_path / "delta", method="lossless")
    report = deltakit.apply(base, tmp_path / "delta", tmp_path / "out")
    assert report.matches_target
    assert_bit_exact(tmp_path / "out", target)
    assert all(t.dtype == torch.float32 for t in fm.load_state(tmp_path / "out").values())


@pytest.mark.parametrize("method", LOSSY)
def test_lossy_codecs_rebuild_a_loadable_checkpoint_close_to_the_finetune(method, bf16_pair, tmp_path):
    import transformers

    base, target = bf16_pair
    delta = deltakit.compress(base, target, tmp_path / "delta", method=method)
    report = deltakit.apply(base, tmp_path / "delta", tmp_path / "out")
    assert not report.matches_target and report.tensors == len(delta.manifest.tensors)
    out, ft, b = fm.load_state(tmp_path / "out"), fm.load_state(target), fm.load_state(base)
    assert out.keys() == ft.keys()
    for name, entry in delta.manifest.tensors.items():
        assert out[name].dtype == ft[name].dtype == torch.bfloat16
        if entry.kind != "encoded":  # vectors are stored exactly
            assert torch.equal(out[name], ft[name]), name
            continue
        err = fm.rel_error(out[name].float() - b[name].float(), ft[name].float() - b[name].float())
        assert err < {"dare": 3.5}.get(method, 0.95), f"{name}: {err:.3f}"
    # the output is a real Hugging Face checkpoint (config copied, tied weights handled)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (target / "config.json").read_text()
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    logits = model(torch.arange(8)[None]).logits
    assert logits.shape == (1, 8, fm.VOCAB) and torch.isfinite(logits).all()


def test_dqrelo_delta_is_on_budget_and_beats_bitdelta_on_a_model(llama_pair):
    base, target = llama_pair
    dq = deltakit.compress(base, target, method="dqrelo", ratio=1 / 8)
    bd = deltakit.compress(base, target, method="bitdelta")
    # never over budget; under by the rank flooring, coarse on 32x64 matrices (one rank = 19% of them)
    assert 1 / 8 * 0.9 <= dq.manifest.stats["ratio"] <= 1 / 8 * 1.01
    assert bd.manifest.stats["ratio"] == pytest.approx(1 / 16, rel=0.05)
    b, ft = fm.load_state(base), fm.load_state(target)
    dq_out = deltakit.apply(base, dq).state_dict
    bd_out = deltakit.apply(base, bd).state_dict
    for name, entry in dq.manifest.tensors.items():
        if entry.kind == "encoded":
            true = ft[name].float() - b[name].float()
            assert fm.rel_error(dq_out[name].float() - b[name].float(), true) < fm.rel_error(
                bd_out[name].float() - b[name].float(), true
            ), name


def test_unchanged_tensors_cost_nothing(frozen_embeddings_pair):
    base, target = frozen_embeddings_pair
    delta = deltakit.compress(base, target, method="dqrelo")
    entry = delta.manifest.tensors["model.embed_tokens.weight"]
    assert entry.kind == "unchanged" and not entry.stored and entry.value is None and not entry.params
    assert entry.shard is None and entry.extra_rows is None
    assert delta.manifest.stats["unchanged_tensors"] == 1
    out = deltakit.apply(base, delta).state_dict
    assert torch.equal(out["model.embed_tokens.weight"], fm.load_state(target)["model.embed_tokens.weight"])


def test_resized_vocabulary_stores_new_rows_exactly(resized_pair, tmp_path):
    base, target = resized_pair
    delta = deltakit.compress(base, target, tmp_path / "delta", method="dqrelo")
    ft, b = fm.load_state(target), fm.load_state(base)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        entry = delta.manifest.tensors[name]
        assert entry.kind == "encoded"
        assert entry.base_shape == [fm.VOCAB, fm.HIDDEN]
        assert entry.shape == [fm.VOCAB + 16, fm.HIDDEN]
        assert entry.extra_rows is not None
    report = deltakit.apply(base, tmp_path / "delta", tmp_path / "out")
    out = fm.load_state(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == ft[name].shape
        assert torch.equal(out[name][fm.VOCAB :], ft[name][fm.VOCAB :]), f"{name}: new rows not exact"
        shared_err = fm.rel_error(
            out[name][: fm.VOCAB].float() - b[name].float(), ft[name][: fm.VOCAB].float() - b[name].float()
        )
        assert shared_err < 0.95
    assert not report.matches_target
    # the grown config travels with the delta
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == fm.VOCAB + 16
    assert delta.manifest.aux_files["config.json"].source == "delta"


def test_resized_vocabulary_lossless_is_bit_exact(resized_pair, tmp_path):
    base, target = resized_pair
    deltakit.compress(base, target, tmp_path / "delta", method="lossless")
    assert deltakit.apply(base, tmp_path / "delta", tmp_path / "out").matches_target
    assert_bit_exact(tmp_path / "out", target)


def test_sharded_checkpoints_in_and_out(sharded_pair, tmp_path):
    base, target = sharded_pair
    delta = deltakit.compress(base, target, tmp_path / "delta", method="lossless", max_shard_bytes=20_000)
    assert len(delta.manifest.files) > 1  # the delta itself is sharded too
    assert all(f.startswith("delta-") for f in delta.manifest.files)
    report = deltakit.apply(base, tmp_path / "delta", tmp_path / "out", max_shard_bytes=40_000)
    assert report.matches_target
    assert (tmp_path / "out" / SAFETENSORS_INDEX).exists()
    assert_bit_exact(tmp_path / "out", target)


def test_bin_checkpoints_compress_and_apply(bin_pair, llama_pair, tmp_path):
    base_bin, target_bin = bin_pair
    delta = deltakit.compress(base_bin, target_bin, tmp_path / "delta", method="lossless")
    report = deltakit.apply(base_bin, tmp_path / "delta", tmp_path / "out")
    assert report.matches_target
    assert_bit_exact(tmp_path / "out", llama_pair[1])
    # same tensors, same identity: a delta made from .bin applies to the safetensors base too
    assert delta.manifest.base.fingerprint == checkpoint_fingerprint(llama_pair[0])
    assert deltakit.apply(llama_pair[0], tmp_path / "delta").matches_target


def test_compress_is_deterministic_on_disk(qwen_pair, tmp_path):
    base, target = qwen_pair
    a = deltakit.compress(base, target, tmp_path / "a", method="dqrelo", seed=3)
    b = deltakit.compress(base, target, tmp_path / "b", method="dqrelo", seed=3)
    assert a.manifest.files == b.manifest.files  # same sha256 for every shard
    assert a.manifest.tensors == b.manifest.tensors


def test_in_memory_and_on_disk_deltas_apply_identically(gpt2_pair, tmp_path):
    base, target = gpt2_pair
    memory = deltakit.compress(base, target, method="svd", rank=4)
    disk = deltakit.compress(base, target, tmp_path / "d", method="svd", rank=4)
    assert memory.path is None and disk.path == tmp_path / "d"
    a = deltakit.apply(base, memory).state_dict
    b = deltakit.apply(base, tmp_path / "d").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    encoded = [e for e in disk.manifest.tensors.values() if e.kind == "encoded"]
    assert encoded and all(e.params["rank"] == 4 for e in encoded)


def test_gpt2_conv1d_layout_is_recorded_and_tensors_keep_their_stored_orientation(gpt2_pair):
    base, target = gpt2_pair
    delta = deltakit.compress(base, target, method="dqrelo")
    entry = delta.manifest.tensors["transformer.h.0.attn.c_attn.weight"]
    assert entry.layout == "in_out" and entry.shape == [fm.HIDDEN, 3 * fm.HIDDEN]
    assert "lm_head.weight" not in delta.manifest.tensors  # tied: stored once, as wte
    out = deltakit.apply(base, delta).state_dict
    assert out["transformer.h.0.attn.c_attn.weight"].shape == (fm.HIDDEN, 3 * fm.HIDDEN)


def test_apply_can_cast_to_another_dtype(qwen_pair):
    base, target = qwen_pair
    delta = deltakit.compress(base, target, method="bitdelta")
    out = deltakit.apply(base, delta, dtype="float32").state_dict
    ref = deltakit.apply(base, delta).state_dict
    assert all(t.dtype == torch.float32 for t in out.values())
    assert all(torch.equal(out[k], ref[k].float()) for k in ref)  # the fine-tune's values, widened


def test_exclude_roles_store_those_matrices_exactly(llama_pair):
    base, target = llama_pair
    delta = deltakit.compress(base, target, method="svd", exclude_roles=("embedding", "lm_head"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert delta.manifest.tensors[name].kind == "passthrough"
    out, ft = deltakit.apply(base, delta).state_dict, fm.load_state(target)
    assert torch.equal(out["lm_head.weight"], ft["lm_head.weight"])


def test_removed_and_new_tensors_round_trip(state_pair):
    base, target = state_pair
    target = dict(target)
    del target["model.layers.0.self_attn.q_proj.weight"]
    target["score.weight"] = torch.randn(3, 64)
    delta = deltakit.compress(base, target, method="dqrelo")
    assert delta.manifest.removed == ["model.layers.0.self_attn.q_proj.weight"]
    assert delta.manifest.tensors["score.weight"].kind == "passthrough"
    out = deltakit.apply(base, delta).state_dict
    assert out.keys() == target.keys()
    assert torch.equal(out["score.weight"], target["score.weight"])


def test_progress_reports_every_tensor_and_finishes(llama_pair):
    base, target = llama_pair
    calls: list[tuple[int, int, str]] = []
    delta = deltakit.compress(
        base, target, method="bitdelta", progress=lambda i, n, name: calls.append((i, n, name))
    )
    total = len(delta.manifest.tensors)
    assert [c[0] for c in calls] == list(range(total + 1))
    assert calls[-1] == (total, total, "")
    applied: list[int] = []
    deltakit.apply(base, delta, progress=lambda i, n, name: applied.append(i))
    assert applied == list(range(total + 1))


def test_verify_checks_files_and_base(llama_pair, tmp_path):
    base, target = llama_pair
    deltakit.compress(base, target, tmp_path / "delta", method="bitdelta")
    report = deltakit.verify(tmp_path / "delta")
    assert report["codec"] == "bitdelta" and report["files_checked"] >= 1 and not report["base_checked"]
    assert deltakit.verify(tmp_path / "delta", base=base)["base_checked"]


def test_manifest_on_disk_records_identities_codec_and_files(qwen_pair, tmp_path):
    base, target = qwen_pair
    deltakit.compress(base, target, tmp_path / "delta", method="dqrelo", ratio=1 / 8, base_name="qwen-base")
    manifest = Manifest.read(tmp_path / "delta")
    assert manifest.base.name == "qwen-base" and manifest.target.name == target.name
    assert manifest.base.fingerprint == checkpoint_fingerprint(base)
    assert manifest.target.fingerprint == checkpoint_fingerprint(target)
    assert manifest.codec.name == "dqrelo" and manifest.codec.budget == {"ratio": 0.125, "rank": None}
    assert manifest.codec.config == deltakit.get_codec("dqrelo").config_class().to_dict()
    listed = set(manifest.files)
    on_disk = {str(p.relative_to(tmp_path / "delta")) for p in (tmp_path / "delta").rglob("*") if p.is_file()}
    assert on_disk - listed == {"manifest.json"}
    assert set(CheckpointReader(base).names()) == {
        n for n, e in manifest.tensors.items() if e.kind != "passthrough" or e.in_base
    }


@pytest.mark.parametrize("method", LOSSY)
def test_changed_integer_matrices_are_stored_exactly(method):
    base = {"model.layers.0.ids": torch.arange(64).reshape(2, 32), "model.layers.0.w": torch.randn(16, 16)}
    target = {"model.layers.0.ids": base["model.layers.0.ids"] * 3, "model.layers.0.w": torch.randn(16, 16)}
    delta = deltakit.compress(base, target, method=method)
    assert delta.manifest.tensors["model.layers.0.ids"].kind == "passthrough"
    out = deltakit.apply(base, delta).state_dict
    assert out["model.layers.0.ids"].dtype == torch.int64
    assert torch.equal(out["model.layers.0.ids"], target["model.layers.0.ids"])


@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("remembered", ["1", "0"])
def test_output_fingerprint_is_the_written_checkpoints_with_unchanged_tensors(
    tmp_path, monkeypatch, dtype, remembered
):
    """Unchanged tensors are written with the base's bytes and take the base's digest (remembered or
    just computed); cast to another dtype they are hashed as written. Either way the reported
    fingerprint is the output checkpoint's own."""
    monkeypatch.setenv("DELTAKIT_DIGEST_CACHE", remembered)
    base, target = fm.make_pair(tmp_path / "models", "llama", keep_embeddings=True)
    delta = deltakit.compress(base, target, tmp_path / "delta", method="dqrelo")
    assert any(e.kind == "unchanged" for e in delta.manifest.tensors.values())
    for attempt in range(2):  # the second apply finds the base's digests remembered (when enabled)
        out = tmp_path / f"out-{attempt}"
        report = deltakit.apply(base, tmp_path / "delta", out, dtype=dtype, fingerprint_output=True)
        assert report.output_fingerprint == checkpoint_fingerprint(out)


def test_apply_queue_counts_the_base_tensor_and_the_rebuilt_one(qwen_pair, monkeypatch):
    """The work queue's byte bound sees what a queued tensor holds until it is written: its base tensor
    and its rebuilt copy at the output dtype (twice a bf16 base's bytes when cast to float32)."""
    import deltakit.core.apply as apply_module

    seen = []
    real_map = apply_module.ordered_map

    def spy(fn, items, workers, **options):
        cost = options["cost"]

        def counted():
            for item in items:
                seen.append((item, cost(item)))
                yield item

        return real_map(fn, counted(), workers, **options)

    monkeypatch.setattr(apply_module, "ordered_map", spy)
    delta = deltakit.compress(*qwen_pair, None, method="svd")
    deltakit.apply(qwen_pair[0], delta, None, dtype="float32")
    assert seen
    for (spec, base_tensor), cost in seen:
        output = spec.nbytes
        assert spec.dtype == torch.float32
        assert cost == output + (base_tensor.nbytes if base_tensor is not None else 0)
        assert base_tensor is None or cost > base_tensor.nbytes


def test_the_output_is_hashed_only_when_it_can_be_the_exact_finetune(tmp_path, monkeypatch):
    """By default a lossy codec's output is not hashed (its report says so with None), an exact codec's
    is; fingerprint_output overrides either way. The base's digests are checked in every case."""
    import deltakit.core.apply as apply_module

    monkeypatch.setenv("DELTAKIT_DIGEST_CACHE", "0")  # every base tensor hashed: counted below
    base, target = fm.make_pair(tmp_path / "models", "llama")
    hashed: list[str] = []
    real = apply_module.fingerprint.tensor_digest

    def counting(name, tensor):
        hashed.append(name)
        return real(name, tensor)

    monkeypatch.setattr(apply_module.fingerprint, "tensor_digest", counting)
    lossy = deltakit.compress(base, target, tmp_path / "svd", method="svd")
    base_tensors = len(apply_module.expected_base_names(lossy))
    hashed.clear()
    report = deltakit.apply(base, tmp_path / "svd", tmp_path / "out-svd")
    assert len(hashed) == base_tensors  # the base only
    assert (report.output_fingerprint, report.matches_target) == (None, None)
    assert report.base_fingerprint == checkpoint_fingerprint(base)
    with pytest.raises(BaseMismatchError):  # the base is still checked without the output's hashes
        deltakit.apply(target, tmp_path / "svd", tmp_path / "out-wrong")

    deltakit.compress(base, target, tmp_path / "lossless", method="lossless")
    exact = deltakit.apply(base, tmp_path / "lossless", tmp_path / "out-lossless")
    assert exact.matches_target is True and exact.output_fingerprint == checkpoint_fingerprint(target)
    skipped = deltakit.apply(base, tmp_path / "lossless", fingerprint_output=False)
    assert (skipped.output_fingerprint, skipped.matches_target) == (None, None)
