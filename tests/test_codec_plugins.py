"""Third-party codecs register through the ``deltakit.codecs`` entry-point group."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import pytest
import torch

import deltakit
from deltakit.codecs import registry
from deltakit.errors import UnknownCodecError

PLUGIN = textwrap.dedent(
    """
    from dataclasses import dataclass

    import torch

    from deltakit import Codec, CodecConfig, Encoded, config_field, register_codec


    @dataclass(frozen=True)
    class HalfConfig(CodecConfig):
        scale: float = config_field(1.0, "multiplier applied on decode")


    @register_codec
    class HalfPrecisionDelta(Codec):
        name = "toy-fp16"
        config_class = HalfConfig
        summary = "the delta in fp16 (a test plug-in)"
        default_ratio = 1.0

        def encode(self, base, target, config, ctx):
            delta = target.float() - base.float()
            return Encoded({"delta": delta.half()}, {"shape": list(delta.shape), "scale": config.scale})

        def decode(self, encoded, device="cpu", base=None):
            return encoded.tensors["delta"].to(device=device, dtype=torch.float32) * encoded.params["scale"]
    """
)


def test_entry_point_codec_is_listed_and_round_trips(tmp_path, monkeypatch, fresh_registry):
    (tmp_path / "toy_codec_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "toy_codec_plugin", raising=False)
    point = EntryPoint(name="toy", value="toy_codec_plugin", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        registry.CODECS, "entry_points", lambda group: [point] if group == point.group else []
    )

    assert "toy-fp16" in deltakit.list_codecs()
    assert "dqrelo" in deltakit.list_codecs()
    base = {"w": torch.randn(8, 8)}
    target = {"w": base["w"] + 0.01 * torch.randn(8, 8)}
    delta = deltakit.compress(base, target, method="toy-fp16")
    rebuilt = deltakit.apply(base, delta).state_dict["w"]
    assert torch.allclose(rebuilt, target["w"], atol=1e-4)


def test_broken_entry_point_warns_and_keeps_builtins(monkeypatch, fresh_registry):
    point = EntryPoint(name="broken", value="no_such_module_for_deltakit", group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry.CODECS, "entry_points", lambda group: [point])
    with pytest.warns(UserWarning, match="broken"):
        names = deltakit.list_codecs()
    assert {"dqrelo", "svd", "lossless"} <= set(names)


def test_builtin_modules_are_found_without_a_list(tmp_path, monkeypatch):
    """A package's every public module is imported on first lookup: a new built-in is one new file."""
    from deltakit.plugins import PluginTable

    package = tmp_path / "fake_builtins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base.py").write_text("raise RuntimeError('infrastructure modules are not imported')\n")
    (package / "_helpers.py").write_text("raise RuntimeError('private modules are not imported')\n")
    (package / "shiny.py").write_text(
        "from fake_builtins_table import TABLE\n\n\n@TABLE.register\nclass Shiny:\n    name = 'shiny'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    table = PluginTable(
        "codec", "no.such.group", "fake_builtins", ("base",), label="method", plural="methods"
    )
    fake_module = type(sys)("fake_builtins_table")
    fake_module.TABLE = table
    monkeypatch.setitem(sys.modules, "fake_builtins_table", fake_module)
    assert table.names() == ["shiny"]
    assert type(table.get("shiny")).__name__ == "Shiny"
    with pytest.raises(UnknownCodecError, match="unknown method 'dull'; known methods: shiny"):
        table.get("dull")
