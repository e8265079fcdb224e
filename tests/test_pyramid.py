"""The pyramid adapters on a stand-in two-stream trunk: shapes, padding, equal gradients in every
backprop mode, what the reversible pyramid stores, and no recomputation in inference."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.structures import ImageList
from torch import nn

import rev_det.modeling.pyramid as pyramid_module
from rev_det.modeling import LayerNorm2d, ReversibleFeaturePyramid, SimpleFeaturePyramid
from rev_det.reversible import BACKPROP_MODES, ReversibleBlock, engine, reversible_sequence
from rev_det.solver import lr_decay_layer_id
from rev_det.utils.memory import MemoryTracker

LEVELS = ["p2", "p3", "p4", "p5", "p6"]


class Coupling(ReversibleBlock):
    """A small trunk block: F = norm + 3x3 conv, G = norm + a 1x1-conv MLP."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.conv = LayerNorm2d(dim), nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2, self.fc1 = LayerNorm2d(dim), nn.Conv2d(dim, 2 * dim, 1)
        self.fc2 = nn.Conv2d(2 * dim, dim, 1)

    def F(self, x):
        return self.conv(self.norm1(x))

    def G(self, x):
        return self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTrunk(Backbone):
    """The trunk contract of RevViT in miniature: patch embedding, two reversible streams run
    by the engine, and a fusion (concat + LayerNorm over 2C)."""

    def __init__(self, dim=16, depth=2, backprop="reversible"):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 16, stride=16)
        self.blocks = nn.ModuleList(Coupling(dim) for _ in range(depth))
        self.norm = LayerNorm2d(2 * dim)
        self.backprop = backprop
        self._out_features = ["last_feat"]
        self._out_feature_channels = {"last_feat": 2 * dim}
        self._out_feature_strides = {"last_feat": 16}

    def forward_streams(self, x):
        x = self.patch_embed(x)
        return reversible_sequence(list(self.blocks), x, x, self.backprop)

    def fuse(self, x1, x2):
        return self.norm(torch.cat([x1, x2], dim=1))

    def forward(self, x):
        return {"last_feat": self.fuse(*self.forward_streams(x))}


class GivenStreams(TinyTrunk):
    """A trunk that returns streams made outside it, so that they are not counted as the
    pyramid's memory; ``forward`` returns their fusion, likewise made outside."""

    def __init__(self, x1, x2):
        super().__init__(dim=x1.shape[1])
        self.x1, self.x2 = x1, x2
        with torch.no_grad():
            fused = self.fuse(x1, x2)
        self.fused = fused.contiguous().requires_grad_(True)

    def forward_streams(self, images):
        return self.x1, self.x2

    def forward(self, images):
        return {"last_feat": self.fused}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make(cls, trunk, **kw):
    torch.manual_seed(0)
    return cls(trunk, out_channels=kw.pop("out_channels", 16), **kw)


@pytest.mark.parametrize("cls", [SimpleFeaturePyramid, ReversibleFeaturePyramid])
@pytest.mark.parametrize("training", [False, True])
def test_output_shape_matches_outputs(cls, training):
    pyramid = make(cls, TinyTrunk()).train(training)
    images = torch.randn(1, 3, 128, 192)
    features = pyramid(images)
    shapes = pyramid.output_shape()
    assert list(features) == list(shapes) == LEVELS
    for name, feature in features.items():
        assert feature.shape[1] == shapes[name].channels == 16
        assert 128 / feature.shape[-2] == 192 / feature.shape[-1] == shapes[name].stride
        assert shapes[name].stride == 2 ** int(name[1:])


@pytest.mark.parametrize("cls", [SimpleFeaturePyramid, ReversibleFeaturePyramid])
def test_padding_constraints_pad_to_the_coarsest_stride(cls):
    assert make(cls, TinyTrunk(), square_pad=1024).padding_constraints == {
        "size_divisibility": 64,
        "square_size": 1024,
    }
    pyramid = make(cls, TinyTrunk())
    # Spelled as Detectron2 main's ImageList.from_tensors reads it.
    assert pyramid.padding_constraints == {"size_divisibility": 64, "square_size": 0}
    assert pyramid.size_divisibility == 64  # what GeneralizedRCNN passes on Detectron2 v0.6
    images = ImageList.from_tensors([torch.zeros(3, 200, 249)], pyramid.size_divisibility)
    assert images.tensor.shape[-2:] == (256, 256)
    assert make(cls, TinyTrunk(), top_block=None).size_divisibility == 32  # p5


@pytest.mark.parametrize("cls", [SimpleFeaturePyramid, ReversibleFeaturePyramid])
def test_padding_constraints_drive_detectron2_main_padding(cls):
    if "padding_constraints" not in inspect.signature(ImageList.from_tensors).parameters:
        pytest.skip("this Detectron2 (v0.6) pads by size_divisibility only")
    pyramid = make(cls, TinyTrunk())
    images = ImageList.from_tensors(
        [torch.zeros(3, 200, 249)], 0, padding_constraints=pyramid.padding_constraints
    )
    assert images.tensor.shape[-2:] == (256, 256)


def gradients(pyramid, images, mode):
    """Outputs and every gradient (adapter, trunk and image) of a loss weighting every level
    differently, with the trunk and the adapter in backprop ``mode``."""
    pyramid.net.backprop = mode
    pyramid.zero_grad(set_to_none=True)
    images = images.detach().requires_grad_(True)
    features = pyramid(images)
    weights = torch.Generator().manual_seed(1)
    loss = sum(
        (i + 1) * (f * torch.randn(f.shape, generator=weights, dtype=f.dtype)).sum()
        for i, f in enumerate(features.values())
    )
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pyramid.named_parameters() if p.grad is not None}
    grads["image"] = images.grad.clone()
    return [f.detach() for f in features.values()], grads


def test_reversible_pyramid_gradients_equal_in_every_backprop_mode_float64():
    pyramid = make(ReversibleFeaturePyramid, TinyTrunk()).double().train()
    images = torch.randn(1, 3, 128, 192, dtype=torch.float64)
    out_ref, ref = gradients(pyramid, images, "autograd")
    assert set(ref) == {n for n, _ in pyramid.named_parameters()} | {"image"}
    for mode in ("reversible", "checkpoint"):
        out, got = gradients(pyramid, images, mode)
        for a, b in zip(out, out_ref):
            assert rel_err(a, b) <= 1e-10, mode
        assert set(got) == set(ref)
        for name in ref:
            assert rel_err(got[name], ref[name]) <= 1e-10, (mode, name)


def stored_after_forward(pyramid):
    """Bytes that the adapter's forward leaves alive (its inputs were made before)."""
    pyramid.train()
    with MemoryTracker() as mem:
        features = pyramid(None)
        stored = mem.current
    return stored, features


def test_reversible_pyramid_stores_its_outputs_only():
    # ViT-S-like streams (C = 192 each) of a 512x512 image, 256-channel pyramid.
    torch.manual_seed(0)
    x1, x2 = (torch.randn(1, 192, 32, 32, requires_grad=True) for _ in range(2))
    trunk = GivenStreams(x1, x2)
    rev, features = stored_after_forward(ReversibleFeaturePyramid(trunk, backprop="reversible"))
    simple, _ = stored_after_forward(SimpleFeaturePyramid(trunk))  # on the fused 2C map
    assert rev <= simple / 4, (rev, simple)
    outputs = sum(f.untyped_storage().nbytes() for f in features.values())
    # Besides the outputs, only p6's max-pool indices (int64, p6's size twice over).
    p6 = features["p6"].untyped_storage().nbytes()
    assert rev <= outputs + 2 * p6, (rev, outputs)


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_inference_uses_no_checkpoint_and_no_custom_function(mode, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("recomputation used in inference")

    pyramid = make(ReversibleFeaturePyramid, TinyTrunk()).train()
    images = torch.randn(1, 3, 64, 64)
    monkeypatch.setattr(pyramid_module, "checkpoint", fail)
    with pytest.raises(AssertionError, match="recomputation"):
        pyramid(images)  # training does recompute: the patch is where it looks
    monkeypatch.setattr(engine._ReversibleFunction, "apply", fail)
    if mode == "eval":
        features = pyramid.eval()(images)
        assert features["p2"].grad_fn is not None  # a plain autograd graph
    else:
        with torch.no_grad():
            features = pyramid(images)
    assert list(features) == LEVELS


def test_backprop_follows_the_trunk_unless_given():
    trunk = TinyTrunk(backprop="checkpoint")
    pyramid = make(ReversibleFeaturePyramid, trunk)
    assert pyramid.backprop == "checkpoint"
    trunk.backprop = "autograd"
    assert pyramid.backprop == "autograd"
    assert make(ReversibleFeaturePyramid, trunk, backprop="reversible").backprop == "reversible"
    for bad in ("revesible", "none"):
        with pytest.raises(ValueError, match="valid"):
            make(ReversibleFeaturePyramid, trunk, backprop=bad)
    assert set(BACKPROP_MODES) == {"reversible", "autograd", "checkpoint"}


def test_pyramid_parameters_are_not_taken_for_trunk_blocks_by_lr_decay():
    pyramid = make(ReversibleFeaturePyramid, TinyTrunk(depth=2))
    for name, _ in pyramid.named_parameters():
        if not name.startswith("net."):
            assert lr_decay_layer_id(name, num_layers=2) == 3, name


def test_simple_pyramid_keeps_vitdet_module_names():
    names = {n for n, _ in make(SimpleFeaturePyramid, TinyTrunk(dim=16)).named_parameters()}
    # ViTDet: simfp_2 = deconv, norm, GELU, deconv, 1x1 conv + norm, 3x3 conv + norm.
    assert {"simfp_2.0.weight", "simfp_2.1.weight", "simfp_2.3.weight"} <= names
    assert {"simfp_2.4.weight", "simfp_2.4.norm.weight", "simfp_2.5.norm.bias"} <= names
    assert {"simfp_3.0.weight", "simfp_4.0.weight", "simfp_5.1.weight"} <= names
    assert "simfp_2.4.bias" not in names  # no conv bias before a norm


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="must be even"):
        make(ReversibleFeaturePyramid, TinyTrunk(), out_channels=15)
    for cls in (SimpleFeaturePyramid, ReversibleFeaturePyramid):
        with pytest.raises(ValueError, match="scale factor 8.0"):
            make(cls, TinyTrunk(), scale_factors=(8.0, 1.0, 0.5))
        with pytest.raises(ValueError, match="top_block reads 'p5'"):
            make(cls, TinyTrunk(), scale_factors=(4.0, 2.0))
    with pytest.raises(ValueError, match="divisible by 4"):
        SimpleFeaturePyramid(TinyTrunk(dim=3), out_channels=8)
    with pytest.raises(TypeError, match="forward_streams"):
        ReversibleFeaturePyramid(nn.Identity(), out_channels=8)
