"""The pyramid adapters on their own: padding, memory, and no recomputation in inference."""

import collections
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.structures import ImageList
from helpers import rel_err
from torch import nn

from rev_det.benchmark import HAS_VITDET
from rev_det.modeling import (
    LayerNorm2d,
    ReversibleFeaturePyramid,
    SimpleFeaturePyramid,
    set_backprop,
)
from rev_det.modeling.pyramid import _Coupling, _log_streams_kept
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


def test_reversible_pyramid_keeps_its_outputs_and_two_numbers_per_pixel_till_backward():
    """Not even the reduced trunk map that every level starts from (backward computes it
    again), nor the levels' coupling streams: each level's output norm is inverted from its
    per-pixel mean and standard deviation."""
    x1, x2 = streams(dim=96, n=32, requires_grad=True)
    pyramid = ReversibleFeaturePyramid(FixedStreams(x1, x2, "reversible"), out_channels=64)
    pyramid.train().requires_grad_(False)
    with MemoryTracker() as mem:
        outputs = pyramid(None)
        stored = mem.current
    assert set(outputs) == {"p2", "p3", "p4", "p5"}
    statistics = sum(2 * o[:, 0].numel() * o.element_size() for o in outputs.values())
    assert stored == sum(o.numel() * o.element_size() for o in outputs.values()) + statistics


def pyramid_gradients(mode, case="inverted"):
    """Outputs and float64 gradients of a reversible pyramid in ``mode`` (norms randomised, so
    that the inversion of the levels' output norms is exercised). ``case``: "inverted", "small
    weight" (one output norm weight too small to invert) or "group norm" (every norm)."""
    x1, x2 = (x.double().requires_grad_(True) for x in streams(dim=32, n=8))
    torch.manual_seed(1)
    trunk = FixedStreams(x1, x2, mode)
    norm = (lambda channels: nn.GroupNorm(4, channels)) if case == "group norm" else "LN"
    pyramid = ReversibleFeaturePyramid(
        trunk, out_channels=16, top_block=LastLevelMaxPool(), norm=norm
    )
    pyramid.double().train()
    for m in pyramid.modules():
        if isinstance(m, (LayerNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    if case == "small weight":
        with torch.no_grad():
            pyramid.levels[0].norm.weight[3] = 1e-4
    outputs = pyramid(None)
    torch.manual_seed(2)
    sum((o * torch.randn_like(o)).sum() for o in outputs.values()).backward()
    grads = {n: p.grad for n, p in pyramid.named_parameters()}
    return outputs, {**grads, "x1": x1.grad, "x2": x2.grad}


@pytest.mark.parametrize("case", ["inverted", "small weight", "group norm"])
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_pyramid_gradients_equal_autograd_float64(mode, case, caplog):
    """Also where a level's output norm has a weight too small to invert, or is not a
    LayerNorm (the level keeps its streams then, and says so)."""
    _log_streams_kept.cache_clear()  # it warns once per process
    ref_out, ref = pyramid_gradients("autograd", case)
    with caplog.at_level("WARNING"):
        out, got = pyramid_gradients(mode, case)
    assert set(got) == set(ref) and all(g is not None for g in got.values())
    for name, expected in ref.items():
        assert rel_err(got[name], expected) <= 1e-10, name
    for name, expected in ref_out.items():
        assert rel_err(out[name], expected) <= 1e-12, name
    kept = "keeps its coupling streams" in caplog.text
    assert kept == (mode == "reversible" and case != "inverted")


def test_reversible_pyramid_levels_are_not_re_run_in_backward(monkeypatch):
    """Each coupling function runs twice per step (forward, and its rebuild in backward), and
    the resampling twice (forward, and its recomputation)."""
    calls = collections.Counter()
    for name in ("F", "G"):
        original = getattr(_Coupling, name)
        monkeypatch.setattr(
            _Coupling, name, lambda self, x, n=name, f=original: calls.update([n]) or f(self, x)
        )
    pyramid = ReversibleFeaturePyramid(FixedStreams(*streams(), "reversible"), out_channels=32)
    pyramid.train()
    for level in pyramid.levels:
        level.resample[0].register_forward_pre_hook(lambda *args: calls.update(["resample"]))
    sum(o.sum() for o in pyramid(None).values()).backward()
    blocks = sum(len(level.couplings) for level in pyramid.levels)
    assert calls == {"F": 2 * blocks, "G": 2 * blocks, "resample": 2 * len(pyramid.levels)}


@pytest.mark.parametrize("mode", ["autograd", "reversible"])
def test_reversible_levels_are_channels_last_from_the_projection_to_the_heads_input(mode):
    """The projection's output, which the couplings take as it is, is channels-last (no layout
    copy of the level's map between them); the levels' outputs are contiguous for the heads."""
    pyramid = ReversibleFeaturePyramid(FixedStreams(*streams(), mode), out_channels=32).train()
    formats = []
    for level in pyramid.levels:
        level.resample[-1].register_forward_hook(
            lambda module, args, out: formats.append(
                out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            )
        )
    outputs = pyramid(None)
    assert formats == [True] * len(pyramid.levels)
    assert all(o.is_contiguous() for o in outputs.values())


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


def test_layer_norm_2d_keeps_its_inputs_memory_format():
    """Contiguous in, contiguous out (the deconvolutions' input); channels-last in, channels-last
    out (the coupling blocks' convolutions), also for a channel slice of a channels-last map."""
    torch.manual_seed(0)
    norm = LayerNorm2d(8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 16, 5, 6)
    expected = F.layer_norm(x[:, :8].permute(0, 2, 3, 1), (8,), norm.weight, norm.bias, norm.eps)
    expected = expected.permute(0, 3, 1, 2)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for given, fmt in [
        (x[:, :8].contiguous(), torch.contiguous_format),
        (channels_last[:, :8].contiguous(memory_format=torch.channels_last), torch.channels_last),
        (channels_last[:, :8], torch.channels_last),
    ]:
        out = norm(given)
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_layer_norm_2d_statistics_are_the_forwards_and_invert_it(fmt):
    """forward_with_statistics returns forward's output bit for bit and each pixel's mean and
    1/std over the channels; inverse rebuilds the input from them (float64: to rounding), as
    dense channel groups in the requested memory format."""
    torch.manual_seed(0)
    norm = LayerNorm2d(8).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = (3 * torch.randn(2, 8, 5, 6, dtype=torch.float64) + 1).contiguous(memory_format=fmt)
    out, mean, rstd = norm.forward_with_statistics(x)
    assert torch.equal(out, norm(x)) and out.is_contiguous(memory_format=fmt)
    var, expected_mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(rstd, torch.rsqrt(var + norm.eps), rtol=1e-12, atol=0)
    halves = norm.inverse(out, mean, rstd, chunks=2, memory_format=torch.channels_last)
    assert len(halves) == 2
    for got, want in zip(halves, x.chunk(2, dim=1)):
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    (whole,) = norm.inverse(out, mean, rstd)
    assert whole.is_contiguous()
    torch.testing.assert_close(whole, x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["reversible", "checkpoint", "autograd"])
def test_pyramid_levels_are_contiguous_for_the_heads(mode):
    pyramid = ReversibleFeaturePyramid(FixedStreams(*streams(), mode), out_channels=32).train()
    outputs = pyramid(None)
    assert all(o.is_contiguous() for o in outputs.values())


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
    # Detectron2's own pyramid (ViTDet's) is there on Detectron2 main only, with its column.
    assert set(stored) == {
        "SimpleFeaturePyramid (autograd)",
        *(f"ReversibleFeaturePyramid ({m})" for m in ("autograd", "checkpoint", "reversible")),
        *([pyramid_memory.DETECTRON2] if HAS_VITDET else []),
    }
    assert all(len(cells) == 6 + HAS_VITDET and float(cells[4]) > 0 for cells in rows)
    by_name = {name.strip(): cells for name, *cells in rows}
    assert by_name["SimpleFeaturePyramid (autograd)"][4].strip() == "1.00x"  # paired with itself
    assert (
        stored["ReversibleFeaturePyramid (reversible)"] < stored["SimpleFeaturePyramid (autograd)"]
    )
