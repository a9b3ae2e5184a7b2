"""The command line end to end, through deltakit_cli.main.main (the installed entry point)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_support import run_cli as run
from safetensors.torch import load_file


def _tiny_llama(path: Path, seed: int, perturb: float = 0.0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    if perturb:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.ndim == 2 and "embed" not in name:
                    param.add_(perturb * torch.randn(param.shape, generator=generator).to(param.dtype))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    return _tiny_llama(root / "base", 0), _tiny_llama(root / "ft", 1, perturb=0.02)


def test_compress_apply_inspect_verify_json(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "delta"
    code, out, _ = run(
        capsys,
        "compress",
        "--method",
        "dqrelo",
        "--base",
        str(base),
        str(ft),
        "-o",
        str(delta),
        "--ratio",
        "1/8",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["codec"] == "dqrelo"
    assert 0.09 < result["stats"]["ratio"] <= 0.126
    assert (delta / "manifest.json").is_file()

    code, out, _ = run(capsys, "inspect", str(delta), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["codec"] == "dqrelo"
    assert {row["kind"] for row in info["tensors"]} == {"encoded", "unchanged"}

    code, out, _ = run(capsys, "verify", str(delta), "--base", str(base), "--json")
    assert code == 0 and json.loads(out)["base_checked"] is True

    code, out, _ = run(capsys, "apply", str(base), str(delta), "-o", str(tmp_path / "out"), "--json")
    assert code == 0
    applied = json.loads(out)  # dqrelo is lossy: its output is not hashed unless asked
    assert applied["matches_target"] is None and applied["output_fingerprint"] is None
    out_dir = str(tmp_path / "out")
    code, out, _ = run(
        capsys, "apply", str(base), str(delta), "-o", out_dir, "--overwrite", "--fingerprint", "--json"
    )
    applied = json.loads(out)
    assert code == 0 and applied["matches_target"] is False and len(applied["output_fingerprint"]) == 71
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 2


def test_lossless_apply_is_bit_exact(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "d"
    assert run(capsys, "compress", "-m", "lossless", "--base", str(base), str(ft), "-o", str(delta))[0] == 0
    code, out, _ = run(capsys, "apply", str(base), str(delta), "-o", str(tmp_path / "out"), "--json")
    assert code == 0 and json.loads(out)["matches_target"] is True
    code, out, _ = run(
        capsys, "apply", str(base), str(delta), "-o", str(tmp_path / "unchecked"), "--no-fingerprint"
    )
    assert code == 0 and "output not fingerprinted" in out and "approximate" not in out
    rebuilt, original = load_file(tmp_path / "out" / "model.safetensors"), load_file(ft / "model.safetensors")
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)


def test_apply_no_sync_flag_reaches_the_library(pair, tmp_path, capsys, monkeypatch):
    import deltakit

    base, ft = pair
    delta = tmp_path / "d"
    assert run(capsys, "compress", "-m", "svd", "--base", str(base), str(ft), "-o", str(delta))[0] == 0
    seen = []
    real_apply = deltakit.apply

    def spy(*args, **kwargs):
        seen.append(kwargs["sync"])
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(deltakit, "apply", spy)
    for flags, out in (([], "a"), (["--no-sync"], "b")):
        code, _, err = run(capsys, "apply", str(base), str(delta), "-o", str(tmp_path / out), *flags)
        assert code == 0, err
    assert seen == [True, False]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_methods_lists_every_codec_with_fields(capsys):
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    described = {m["name"]: m for m in json.loads(out)}
    assert {"dqrelo", "bitdelta", "svd", "dare", "lossless"} <= set(described)
    assert "compensation" in {f["name"] for f in described["dqrelo"]["config"]}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--method", "nope"], 2, "known methods: "),
        (["--set", "nosuchkey=1"], 2, "valid keys: "),
        (["--set", "compensation=sometimes"], 2, "choose one of"),
        (["--method", "bitdelta", "--ratio", "1/8"], 2, "cannot reach ratio"),
        (["--ratio", "1/32"], 2, "1/16"),
        (["--ratio", "abc"], 2, "not a ratio"),
        (["--method", "lossless", "--ratio", "1/8"], 2, "lossless keeps every bit"),
    ],
)
def test_compress_bad_arguments_exit_nonzero_with_one_line(pair, tmp_path, capsys, args, code, message):
    base, ft = pair
    out_dir = tmp_path / "d"
    got, _, err = run(capsys, "compress", "--base", str(base), str(ft), "-o", str(out_dir), *args)
    assert got == code
    assert message in err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_apply_to_wrong_base_refused_then_forced(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "d"
    assert run(capsys, "compress", "-m", "svd", "--base", str(base), str(ft), "-o", str(delta))[0] == 0
    code, _, err = run(capsys, "apply", str(ft), str(delta), "-o", str(tmp_path / "out"))
    assert code == 5 and "--force" in err
    assert not (tmp_path / "out").exists()
    code, _, err = run(capsys, "apply", str(ft), str(delta), "-o", str(tmp_path / "out"), "--force")
    assert code == 0 and "warning" in err
    code, _, err = run(capsys, "verify", str(delta), "--base", str(ft))
    assert code == 5


def test_corrupted_and_truncated_shard_refused(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "d"
    assert run(capsys, "compress", "--base", str(base), str(ft), "-o", str(delta))[0] == 0
    shard = next(delta.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run(capsys, "apply", str(base), str(delta), "-o", str(tmp_path / "out"))
    assert code == 4 and "corrupted" in err
    shard.write_bytes(bytes(data[:-100]))
    code, _, err = run(capsys, "verify", str(delta))
    assert code == 4 and "truncated" in err
    assert not (tmp_path / "out").exists()


def test_newer_format_version_refused(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "d"
    assert run(capsys, "compress", "--base", str(base), str(ft), "-o", str(delta))[0] == 0
    manifest = json.loads((delta / "manifest.json").read_text())
    manifest["format_version"] = 99
    (delta / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "inspect", str(delta))
    assert code == 3 and "newer" in err


def test_output_exists_needs_overwrite(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "d"
    delta.mkdir()
    code, _, err = run(capsys, "compress", "--base", str(base), str(ft), "-o", str(delta))
    assert code == 2 and "--overwrite" in err
    assert run(capsys, "compress", "--base", str(base), str(ft), "-o", str(delta), "--overwrite")[0] == 0
    assert (delta / "manifest.json").is_file()


def test_nan_in_finetune_refused(pair, tmp_path, capsys):
    base, ft = pair
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(ft / "model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    (bad / "config.json").write_bytes((ft / "config.json").read_bytes())
    code, _, err = run(capsys, "compress", "--base", str(base), str(bad), "-o", str(tmp_path / "d"))
    assert code == 7 and name in err


def test_missing_tensor_in_base_refused(pair, tmp_path, capsys):
    base, ft = pair
    delta = tmp_path / "d"
    assert run(capsys, "compress", "-m", "bitdelta", "--base", str(base), str(ft), "-o", str(delta))[0] == 0
    partial = tmp_path / "partial"
    partial.mkdir()
    tensors = load_file(base / "model.safetensors")
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    from safetensors.torch import save_file

    save_file(tensors, partial / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run(capsys, "apply", str(partial), str(delta), "-o", str(tmp_path / "out"))
    assert code == 6 and dropped in err


def test_cuda_requested_without_gpu_is_a_clear_error(pair, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    base, ft = pair
    code, _, err = run(
        capsys, "compress", "--base", str(base), str(ft), "-o", str(tmp_path / "d"), "--device", "cuda"
    )
    assert code == 2 and "no CUDA device" in err


@pytest.mark.parametrize("device", ["cuda:x", "mps", "", "cuda:-1"])
def test_a_malformed_or_unknown_device_is_a_usage_error(pair, tmp_path, capsys, device):
    base, ft = pair
    code, _, err = run(
        capsys, "compress", "--base", str(base), str(ft), "-o", str(tmp_path / "d"), "--device", device
    )
    assert code == 2 and "device" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("base differs; pass force=True to apply anyway", "base differs; pass --force to apply anyway"),
        (
            "needs calibration data: pass data=[FILE_OR_DIR] (text)",
            "needs calibration data: pass --data FILE_OR_DIR (text)",
        ),
        (
            "raise tokens= to at least 64 or lower overrides[batch_size]",
            "raise --tokens to at least 64 or lower --set batch_size",
        ),
        (
            "needs a target: reduction=0.12 or overrides[rank]=R",
            "needs a target: --reduction 0.12 or --set rank=R",
        ),
        ("unknown overrides key 'x' for DQReloConfig", "unknown --set key 'x' for DQReloConfig"),
        ("min_rank_ratio=0.25 stays as it is", "min_rank_ratio=0.25 stays as it is"),
    ],
)
def test_library_parameter_names_are_shown_as_flags(message, shown):
    from deltakit_cli.common import parameters_as_flags

    assert parameters_as_flags(message) == shown
