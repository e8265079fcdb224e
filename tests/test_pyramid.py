"""The pyramid adapters on their own: padding, memory, and no recomputation in inference."""

import os
import sys

import pytest
import torch
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.structures import ImageList

from rev_det.modeling import ReversibleFeaturePyramid, SimpleFeaturePyramid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools"))
from pyramid_memory import FixedStreams, measure  # noqa: E402


def streams(dim=96, n=16, **kw):
    torch.manual_seed(0)
    return [torch.randn(1, dim, n, n, **kw) for _ in range(2)]


@pytest.mark.parametrize("cls", [SimpleFeaturePyramid, ReversibleFeaturePyramid])
def test_padding_constraints_enforce_the_coarsest_stride(cls):
    pyramid = cls(
        FixedStreams(*streams(), "reversible"),
        out_channels=32,
        top_block=LastLevelMaxPool(),
        square_pad=0,
    )
    assert pyramid.size_divisibility == 64  # p6
    # Spelled as Detectron2 main reads it (its own SimpleFeaturePyramid misspells the key).
    assert pyramid.padding_constraints == {"size_divisibility": 64, "square_size": 0}
    images = ImageList.from_tensors([torch.zeros(3, 200, 249)], pyramid.size_divisibility)
    assert images.tensor.shape[-2:] == (256, 256)


def test_reversible_pyramid_stores_under_a_quarter_of_the_simple_one():
    x1, x2 = streams(dim=96, n=32, requires_grad=True)
    common = dict(out_channels=64, top_block=LastLevelMaxPool(), norm="LN")
    simple, _ = measure(SimpleFeaturePyramid(FixedStreams(x1, x2, "autograd"), **common))
    rev, _ = measure(ReversibleFeaturePyramid(FixedStreams(x1, x2, "reversible"), **common))
    assert rev <= simple / 4, (rev, simple)


def test_inference_uses_no_recomputation(monkeypatch):
    import rev_det.modeling.pyramid as pyramid_module

    def fail(*args, **kwargs):
        raise AssertionError("checkpoint used in inference")

    monkeypatch.setattr(pyramid_module, "checkpoint", fail)
    pyramid = ReversibleFeaturePyramid(FixedStreams(*streams(), "reversible"), out_channels=32)
    with torch.no_grad():
        outputs = pyramid.eval()(None)
    assert set(outputs) == {"p2", "p3", "p4", "p5"}
