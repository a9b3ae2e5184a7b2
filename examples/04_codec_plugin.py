"""A third-party codec in one file: register it with ``deltakit.codecs.register_codec`` and compress with it.

Shows the codec contract: a frozen config dataclass (fields with help text, settable as ``--set key=value``
or ``overrides``), ``encode(base, target, config, ctx) -> Encoded`` (pure, returns the tensors to store and
JSON parameters) and ``decode(encoded, device) -> dense fp32 delta``. The codec here stores each row of the
delta as int8 with one fp16 scale per row (about half the size of the fp16 delta). A package would expose
the same class through the ``deltakit.codecs`` entry-point group instead of importing it.

    python examples/04_codec_plugin.py --tiny
    python examples/04_codec_plugin.py --base BASE_DIR --finetune FT_DIR --set bits=6
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from _tiny import ensure_pair, pair_parser, parse_pair

import deltakit
from deltakit.codecs import Codec, CodecConfig, EncodeContext, Encoded, config_field, register_codec


@dataclass(frozen=True)
class RowIntConfig(CodecConfig):
    bits: int = config_field(
        8, "bits per value (2..8); values are stored in int8 either way", choices=tuple(range(2, 9))
    )


@register_codec
class RowIntCodec(Codec):
    """Symmetric per-row integer quantization of the delta ``target - base``."""

    name = "example-rowint"
    version = 1
    config_class = RowIntConfig
    summary = "example plug-in: per-row symmetric int quantization of the delta"
    default_ratio = 0.5

    def encode(
        self, base: torch.Tensor, target: torch.Tensor, config: RowIntConfig, ctx: EncodeContext
    ) -> Encoded:
        delta = target.to(ctx.device, torch.float32) - base.to(ctx.device, torch.float32)  # (out, in)
        levels = 2 ** (config.bits - 1) - 1
        scale = delta.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels  # (out, 1)
        q = torch.round(delta / scale).clamp(-levels, levels).to(torch.int8)  # (out, in)
        return Encoded({"q": q.cpu(), "scale": scale.to(torch.float16).cpu()}, {"bits": config.bits})

    def decode(
        self, encoded: Encoded, device: torch.device | str = "cpu", base: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, scale = encoded.tensors["q"].to(device), encoded.tensors["scale"].to(device)
        return q.to(torch.float32) * scale.to(torch.float32)  # (out, in)


def load_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


def main() -> int:
    parser = pair_parser(__doc__.splitlines()[0])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parse_pair(parser)
    print(f"registered codecs: {', '.join(deltakit.list_codecs())}")
    overrides = dict(item.split("=", 1) for item in args.sets)
    with tempfile.TemporaryDirectory(prefix="deltakit-example-") as tmp:
        ensure_pair(args, Path(tmp))
        delta = deltakit.compress(args.base, args.finetune, Path(tmp) / "delta", method=RowIntCodec.name,
                                  overrides=overrides)  # fmt: skip
        manifest = deltakit.load_delta(Path(tmp) / "delta").manifest
        print(
            f"delta: codec {manifest.codec.name} v{manifest.codec.version}, config {manifest.codec.config}, "
            f"{manifest.stats['stored_bytes']} bytes"
        )
        rebuilt = deltakit.apply(args.base, delta, None).state_dict
        target, base = load_state(args.finetune), load_state(args.base)
        name = next(k for k in target if target[k].ndim == 2 and "proj" in k)
        base_w, want = base[name].float(), target[name].float()
        err = float((rebuilt[name].float() - want).norm() / (want - base_w).norm())
        print(f"{name}: error after apply is {err:.2e} of the fine-tune's own change")
    ok = manifest.codec.name == RowIntCodec.name and err < 0.5
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
