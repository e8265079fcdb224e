"""The pyramid adapters on their own: padding, memory, and no recomputation in inference."""

import os
import sys

import pytest
import torch
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.structures import ImageList

from rev_det.modeling import ReversibleFeaturePyramid, SimpleFeaturePyramid, set_backprop
from rev_det.utils import MemoryTracker

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
    assert pyramid.padding_constraints == {"size_divisibility": 64}
    images = ImageList.from_tensors([torch.zeros(3, 200, 249)], pyramid.size_divisibility)
    assert images.tensor.shape[-2:] == (256, 256)


def test_reversible_pyramid_stores_under_a_quarter_of_the_simple_one():
    x1, x2 = streams(dim=96, n=32, requires_grad=True)
    common = dict(out_channels=64, top_block=LastLevelMaxPool(), norm="LN")
    simple, _ = measure(SimpleFeaturePyramid(FixedStreams(x1, x2, "autograd"), **common))
    rev, _ = measure(ReversibleFeaturePyramid(FixedStreams(x1, x2, "reversible"), **common))
    assert rev <= simple / 4, (rev, simple)


def test_reversible_pyramid_keeps_nothing_but_its_outputs_till_backward():
    """Not even the reduced trunk map that every level starts from: backward computes it again."""
    x1, x2 = streams(dim=96, n=32, requires_grad=True)
    pyramid = ReversibleFeaturePyramid(FixedStreams(x1, x2, "reversible"), out_channels=64)
    pyramid.train().requires_grad_(False)
    with MemoryTracker() as mem:
        outputs = pyramid(None)
        stored = mem.current
    assert stored == sum(o.numel() * o.element_size() for o in outputs.values())
    assert set(outputs) == {"p2", "p3", "p4", "p5"}


@pytest.mark.parametrize("mode,fusions", [("reversible", 3), ("checkpoint", 2), ("autograd", 1)])
def test_the_streams_are_fused_once_per_pass_not_once_per_level(mode, fusions, monkeypatch):
    """Reversible: forward, once for the levels' backward, once under autograd; checkpoint:
    forward and its re-run (whatever the number of levels)."""
    x1, x2 = streams(requires_grad=True)
    trunk = FixedStreams(x1, x2, mode)
    pyramid = ReversibleFeaturePyramid(trunk, out_channels=64).train()
    calls, fuse = [], trunk.fuse
    monkeypatch.setattr(trunk, "fuse", lambda *xs: calls.append(1) or fuse(*xs))
    sum(o.sum() for o in pyramid(None).values()).backward()
    assert len(calls) == fusions and x1.grad is not None


def test_reversible_pyramid_resamples_as_the_simple_one():
    """ViTDet's pyramid with the 3x3 conv replaced by couplings: same resampling per level."""
    x1, x2 = streams()
    simple = SimpleFeaturePyramid(FixedStreams(x1, x2, "autograd"), width=96, out_channels=32)
    rev = ReversibleFeaturePyramid(FixedStreams(x1, x2, "reversible"), out_channels=32)
    for stage, level in zip(simple.stages, rev.levels, strict=True):
        shapes = [[tuple(p.shape) for p in m.parameters()] for m in stage[:-1]]
        assert [[tuple(p.shape) for p in m.parameters()] for m in level.resample] == shapes
        assert [type(m) for m in level.resample] == [type(m) for m in stage[:-1]]
    assert [p.shape for p in rev.reduce.parameters()] == [
        p.shape for p in simple.reduce.parameters()
    ]


def test_inference_uses_no_recomputation(monkeypatch):
    import rev_det.reversible.modes as modes

    def fail(*args, **kwargs):
        raise AssertionError("checkpoint used in inference")

    monkeypatch.setattr(modes, "checkpoint", fail)
    pyramid = ReversibleFeaturePyramid(FixedStreams(*streams(), "reversible"), out_channels=32)
    with torch.no_grad():
        outputs = pyramid.eval()(None)
    assert set(outputs) == {"p2", "p3", "p4", "p5"}


@pytest.mark.parametrize("pyramid", ["reversible", "simple"])
def test_patch_8_trunk_gets_the_same_p2_p6_pyramid(pyramid):
    """The pyramids derive their default scale factors from the trunk's stride."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec

    from rev_det import add_revdet_config
    from rev_det.modeling import build_rev_vit_backbone

    cfg = get_cfg()
    add_revdet_config(cfg)
    cfg.MODEL.REVVIT.merge_from_list(
        ["IMG_SIZE", 128, "PRETRAIN_IMG_SIZE", 128, "PATCH_SIZE", 8, "EMBED_DIM", 32]
    )
    cfg.MODEL.REVVIT.merge_from_list(["DEPTH", 2, "NUM_HEADS", 2, "WINDOW_SIZE", 4])
    cfg.MODEL.REVVIT.WINDOW_BLOCK_INDEXES = [0]
    cfg.MODEL.FPN.OUT_CHANNELS = 16
    cfg.MODEL.REV.PYRAMID = pyramid
    torch.manual_seed(0)
    backbone = build_rev_vit_backbone(cfg, ShapeSpec(channels=3)).double().train()
    strides = {f"p{k}": 2**k for k in range(2, 7)}
    assert {k: v.stride for k, v in backbone.output_shape().items()} == strides
    x = torch.randn(1, 3, 128, 192, dtype=torch.float64, requires_grad=True)
    outputs = backbone(x)
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        k: (1, 16, 128 // s, 192 // s) for k, s in strides.items()
    }
    if pyramid == "reversible":  # the stride-8 levels (p5 by space-to-depth 4) invert exactly
        grads = {}
        for mode in ("autograd", "reversible"):
            set_backprop(backbone, mode)
            backbone.zero_grad(set_to_none=True)
            x.grad = None
            torch.manual_seed(1)  # the same drop-path draws in both modes
            sum(v.pow(2).sum() for v in backbone(x).values()).backward()
            grads[mode] = [p.grad.clone() for p in backbone.parameters()] + [x.grad.clone()]
        for a, b in zip(grads["autograd"], grads["reversible"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [SimpleFeaturePyramid, ReversibleFeaturePyramid])
def test_unsupported_scale_factor_is_named(cls):
    with pytest.raises(ValueError, match=r"scale factor 0.125 .*patch size 8 or 16"):
        cls(FixedStreams(*streams(), "reversible"), out_channels=32, scale_factors=(1.0, 0.125))


def test_pyramid_memory_tool_reports_every_adapter_with_times(capsys):
    import pyramid_memory

    pyramid_memory.main(["--size", "256", "--dim", "64", "--out-channels", "32", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()[2:]]
    stored = {name.strip(): float(cells[0]) for name, *cells in rows}
    assert set(stored) == {
        "SimpleFeaturePyramid (autograd)",
        *(f"ReversibleFeaturePyramid ({m})" for m in ("autograd", "checkpoint", "reversible")),
    }
    assert all(len(cells) == 6 and float(cells[4]) > 0 for cells in rows)
    assert (
        stored["ReversibleFeaturePyramid (reversible)"] < stored["SimpleFeaturePyramid (autograd)"]
    )
