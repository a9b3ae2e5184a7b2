"""A codec written as one file is picked up everywhere: the CLI, the conformance checks, the runtime.

The codec below lives in one module, announced through the ``deltakit.codecs`` entry-point group as a
third-party package's would be (a built-in is one module in ``deltakit/codecs/``, found the same way by
its register decorator: see ``test_builtin_modules_are_found_without_a_list``). It stores its low-rank factors under its own names (``left``/``right``),
so the runtime can only find them through the factored view the codec declares.
"""

from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import test_codecs_conformance as conformance
import torch
from test_cli import run

import deltakit
from deltakit.codecs import registry
from deltakit.runtime.kernels import linear_delta
from deltakit.runtime.prepared import prepare_delta

NEW_CODEC = textwrap.dedent(
    """
    from dataclasses import dataclass

    import torch

    from deltakit import Codec, CodecConfig, Encoded, FactoredView, StoredTensor, config_field, register_codec
    from deltakit.ops.svd import svd_factors


    @dataclass(frozen=True)
    class HalvesConfig(CodecConfig):
        power_iters: int = config_field(2, "power iterations of the randomized SVD")


    @register_codec
    class Halves(Codec):
        name = "halves"
        config_class = HalvesConfig
        summary = "rank = min(rows, cols) // 8 truncated SVD in fp32 (a one-file test codec)"
        max_error = 0.9

        def _rank(self, shape):
            return max(1, min(shape) // 8)

        def encode(self, base, target, config, ctx):
            delta = target.float() - base.float()  # (rows, cols)
            up, down = svd_factors(delta, self._rank(delta.shape), power_iters=config.power_iters, seed=ctx.tensor_seed())
            return Encoded({"left": up.contiguous(), "right": down.contiguous()}, {"shape": list(delta.shape)})

        def decode(self, encoded, device="cpu", base=None):
            return encoded.tensors["left"].to(device) @ encoded.tensors["right"].to(device)

        def stored_tensors(self, shape, dtype, config, budget):
            rank = self._rank(shape)
            return {"left": StoredTensor("float32", (shape[0], rank)), "right": StoredTensor("float32", (rank, shape[1]))}

        def factored(self, encoded):
            t = encoded.tensors
            return FactoredView(tuple(encoded.params["shape"]), up=t["left"], down=t["right"])
    """
)


@pytest.fixture
def new_codec(tmp_path, monkeypatch, fresh_registry):
    """The one-file codec on sys.path, announced through the entry-point group next to the built-ins."""
    (tmp_path / "halves_codec.py").write_text(NEW_CODEC)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "halves_codec", raising=False)
    point = EntryPoint(name="halves", value="halves_codec", group=registry.ENTRY_POINT_GROUP)
    real = registry.CODECS.entry_points
    monkeypatch.setattr(
        registry.CODECS,
        "entry_points",
        lambda group: [*real(group=group), point] if group == point.group else [],
    )
    return "halves"


def test_cli_lists_and_compresses_with_the_new_codec(new_codec, capsys, tmp_path, llama_pair):
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    described = {m["name"]: m for m in json.loads(out)}
    assert "power_iters" in {f["name"] for f in described["halves"]["config"]}
    base, target = llama_pair
    code, out, err = run(capsys, "compress", "--method", "halves", "--base", str(base), str(target),
                         "-o", str(tmp_path / "delta"), "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["codec"] == "halves"
    report = deltakit.apply(base, tmp_path / "delta")
    assert (
        report.tensors > 0
        and report.base_fingerprint == deltakit.load_delta(tmp_path / "delta").manifest.base.fingerprint
    )


def test_conformance_checks_run_on_the_new_codec(new_codec):
    assert new_codec in deltakit.list_codecs()
    conformance.test_round_trip_error_is_within_the_codec_bound(new_codec, torch.float32)
    conformance.test_declared_stored_tensors_match_what_encode_stores(
        new_codec, (conformance.ROWS, conformance.COLS)
    )
    conformance.test_factored_view_decodes_to_the_same_delta(new_codec)
    conformance.test_encode_is_deterministic_under_a_seed(new_codec)
    conformance.test_encode_and_decode_do_not_mutate_inputs(new_codec)
    conformance.test_decode_on_cpu_gives_dense_fp32_delta(new_codec, "cpu")
    conformance.test_encoded_params_are_json_serialisable(new_codec)
    conformance.test_codec_describes_itself(new_codec)


def test_runtime_fast_path_uses_the_declared_factored_view(new_codec, state_pair):
    base, target = state_pair
    delta = deltakit.compress(base, target, method=new_codec)
    prepared = prepare_delta("t", delta, resolve=lambda name: name)
    assert prepared.factored  # no name list: the codec's view makes it eligible
    name = "model.layers.0.self_attn.q_proj.weight"
    op = prepared.ops[name]
    assert set(op.tensors) == {"left", "right"} and op.view is not None
    x = torch.randn(3, base[name].shape[1])
    dense = deltakit.Decoder.of(delta).delta_fp32(name, base[name])  # (out, in)
    assert torch.allclose(linear_delta(x, op, "out_in"), x @ dense.T, atol=1e-5)
