"""A codec's factored view is checked when it is made, and a mixed batch checks it against the layer.

The batched kernels take their sizes from the views, so a view whose parts disagree with its shape, or a
shape that is not the served layer's, is refused before any kernel runs.
"""

from __future__ import annotations

import pytest
import torch
from test_runtime_support import cached_fleet
from torch import nn

from deltakit.codecs.base import FactoredView
from deltakit.codecs.registry import get_codec
from deltakit.core.decode import load_delta
from deltakit.errors import FormatError, TensorMismatchError
from deltakit.ops.quant import quantize
from deltakit.runtime.batchplan import ModulePlan, Part
from deltakit.runtime.prepared import PreparedDelta, TensorOp, prepare_delta


def test_views_whose_parts_do_not_make_their_shape_are_refused():
    up, down = torch.zeros(6, 2), torch.zeros(2, 5)
    FactoredView((6, 5), up=up, down=down)
    FactoredView((6, 8), signs=torch.zeros(6, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"do not make a \[6, 6\] matrix"):
        FactoredView((6, 6), up=up, down=down)
    with pytest.raises(ValueError, match=r"do not make"):
        FactoredView((6, 5), up=up, down=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="sign bytes cannot hold"):
        FactoredView((6, 8), signs=torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="sign bytes cannot hold"):
        FactoredView((6, 8), signs=torch.zeros(6, dtype=torch.int8))
    q_up, q_down = quantize(up, 4, 16, 0), quantize(torch.zeros(2, 6), 4, 16, 1)
    with pytest.raises(ValueError, match="shapes of up and down"):
        FactoredView((6, 5), up=up, down=down, quantized=(q_up, q_down))
    # quantized factors alone (their codes held, dequantized on access) must make the shape too
    view = FactoredView((6, 6), signs=torch.zeros(5, dtype=torch.uint8), quantized=(q_up, q_down))
    assert view.has_low_rank and view.rank == 2 and tuple(view.up.shape) == (6, 2)
    with pytest.raises(ValueError, match=r"do not make a \[6, 8\] matrix"):
        FactoredView((6, 8), signs=torch.zeros(6, dtype=torch.uint8), quantized=(q_up, q_down))


def test_a_codec_failing_to_make_its_view_is_one_format_error(monkeypatch):
    fleet = cached_fleet("llama")
    codec = type(get_codec("svd"))

    def broken(self, encoded):
        raise ValueError("no view today")

    monkeypatch.setattr(codec, "factored", broken)
    with pytest.raises(FormatError, match="no view today"):
        prepare_delta("svd", load_delta(fleet["delta"]["svd-2"]), lambda name: name)


def test_a_view_of_another_shape_than_the_layer_is_refused_by_the_batch_plan():
    layer = nn.Linear(8, 4)
    view = FactoredView((4, 6), up=torch.zeros(4, 2), down=torch.zeros(2, 6))
    op = TensorOp("layer.weight", "encoded", torch.float32, {}, {}, "out_in", view)
    prepared = PreparedDelta("d", get_codec("svd"), "sha256:0", {"layer.weight": op})
    part = Part(prepared, slice(0, 1), [0], {"weight": op}, "factored")
    with pytest.raises(
        TensorMismatchError, match=r"as a \[4, 6\] matrix; the served model holds it as \[4, 8\]"
    ):
        ModulePlan(layer, "out_in", 1, [part])
    fits = TensorOp(
        "layer.weight",
        "encoded",
        torch.float32,
        {},
        {},
        "out_in",
        FactoredView((4, 8), up=torch.zeros(4, 2), down=torch.zeros(2, 8)),
    )
    ModulePlan(layer, "out_in", 1, [Part(prepared, slice(0, 1), [0], {"weight": fits}, "factored")])
