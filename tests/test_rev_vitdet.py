"""RevViTDet, the reversible surrogate of ViTDet's ViT: the scaled coupling in the engine, the
ViT's function at (alpha, beta) = (1, 0), checkpoints, the schedule and the mode switch."""

import copy
import logging
import math
import os
import pickle
import sys
from functools import partial

import detectron2
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import LazyConfig, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_model
from detectron2.utils.events import EventStorage
from helpers import (
    ROOT,
    TINY_LAZY,
    TINY_YACS,
    Block,
    fake_batch,
    make_stack,
    rel_err,
    run,
    tiny_cfg,
    yacs_cfg,
)
from torch import nn

from rev_det.benchmark import HAS_VITDET
from rev_det.checkpoint import AtomicCheckpointer
from rev_det.modeling import RevViTDet, set_backprop
from rev_det.reversible import ADDITIVE, ScaledCoupling, reversible_sequence
from rev_det.training import CouplingSchedule
from rev_det.utils.memory import MemoryTracker

sys.path.insert(0, os.path.join(ROOT, "tools"))

from demo_equivalence import nms_in_score_dtype  # noqa: E402

VITDET_B_LAZY = os.path.join(ROOT, "configs", "COCO", "mask_rcnn_rev_vitdet_b_100ep.py")
VITDET_B_YAML = os.path.join(ROOT, "configs", "COCO", "mask_rcnn_rev_vitdet_b.yaml")
# A small ViT: 4x4 tokens on 64-pixel images, windows of 3 (padded to 6x6) in blocks 0 and 2.
TINY = dict(
    img_size=64,
    patch_size=16,
    embed_dim=48,
    depth=4,
    num_heads=2,
    window_size=3,
    window_block_indexes=(0, 2),
    use_rel_pos=True,
    pretrain_img_size=32,
)


def scaled_stack(depth, alpha, beta, **kw):
    """make_stack's blocks, each with a scaled coupling at (alpha, beta)."""
    stack = make_stack(depth, **kw)
    for block in stack:
        block.coupling = ScaledCoupling(alpha, beta)
    return stack.to(torch.float64)


def stack_grads(stack, x1, x2, mode):
    stack.zero_grad(set_to_none=True)
    x1, x2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    torch.manual_seed(3)  # dropout and drop path draw the same masks in every mode
    y1, y2 = reversible_sequence(list(stack), x1, x2, mode)
    (y1 * 1.5 + y2.sin()).sum().backward()
    return [x1.grad, x2.grad] + [p.grad for p in stack.parameters()]


# ---------------------------------------------------------------------------- the coupling


def test_additive_coupling_is_the_default_and_scaled_at_0_1_is_it_to_the_bit():
    """RevViT's coupling is unchanged: a scaled coupling at (0, 1) gives the same outputs and
    gradients bit for bit (float32, reversible mode, dropout and drop path on)."""
    plain = make_stack(3, dtype=torch.float32)
    assert all(block.coupling is ADDITIVE for block in plain)
    scaled = copy.deepcopy(plain)
    for block in scaled:
        block.coupling = ScaledCoupling(0.0, 1.0)
    plain.train(), scaled.train()
    x = torch.randn(2, 5, 16)
    for a, b in zip(
        stack_grads(plain, x, x, "reversible"), stack_grads(scaled, x, x, "reversible")
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("alpha, beta", [(0.5, 0.5), (0.3, 0.8), (1.0, 0.25), (0.0, 2.0)])
def test_scaled_coupling_gradients_equal_autograd_in_every_mode(alpha, beta):
    stack = scaled_stack(4, alpha, beta).train()
    x1, x2 = torch.randn(2, 2, 5, 16, dtype=torch.float64)
    reference = stack_grads(stack, x1, x2, "autograd")
    for mode in ("checkpoint", "reversible"):
        for got, want in zip(stack_grads(stack, x1, x2, mode), reference):
            assert rel_err(got, want) < 1e-10, mode


def test_scaled_coupling_inverse_and_formula():
    block = Block()
    block.coupling = ScaledCoupling(0.4, 0.7)
    block.double().eval()  # the coefficients too
    x1, x2 = torch.randn(2, 2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        y1, y2 = block(x1, x2)
        assert rel_err(y1, 0.7 * x1 + 0.4 * x2 + block.F(x2)) < 1e-14
        assert rel_err(y2, 0.7 * x2 + 0.4 * y1 + block.G(y1)) < 1e-14
        r1, r2 = block.inverse(y1, y2)
    assert rel_err(r1, x1) < 1e-12 and rel_err(r2, x2) < 1e-12


def test_reversible_mode_refuses_beta_zero_naming_the_block():
    stack = scaled_stack(2, 1.0, 0.0).train()
    stack[1].coupling.set(1.0, 0.5)
    stack[0].qualified_name = "net.blocks.0"
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=r"block 0 .*'net.blocks.0'.* beta = 0.*checkpoint"):
        reversible_sequence(list(stack), x, x, "reversible")
    reversible_sequence(list(stack), x, x, "checkpoint")  # exact at any beta


def test_coupling_coefficients_are_buffers_saved_and_loaded():
    trunk = RevViTDet(**TINY)
    trunk.couplings()[2].set(0.25, 0.75)
    state = trunk.state_dict()
    assert state["blocks.2.coupling.alpha"] == 0.25 and state["blocks.2.coupling.beta"] == 0.75
    fresh = RevViTDet(**TINY)
    fresh.load_state_dict(state)
    assert float(fresh.couplings()[2].alpha) == 0.25
    assert not any("coupling" in name for name, _ in fresh.named_parameters())


# ------------------------------------------------------------------ the ViT's function, exactly


def randomize(module, seed=0):
    """Every parameter perturbed, so that norms, biases and position tables all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return module


def _rel_pos(table, size):
    """(size, size, C): table[i - j + size - 1] (the table has 2 * size - 1 rows)."""
    idx = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
    return table[idx]


def _attention(x, sd, prefix, heads):
    """ViTDet's attention written out: softmax(q k^T / sqrt(d) + rel. position bias) v."""
    b, h, w, c = x.shape
    qkv = F.linear(x, sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"])
    q, k, v = qkv.reshape(b, h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    q_grid = q.reshape(b, heads, h, w, -1)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, _rel_pos(sd[prefix + "rel_pos_h"], h))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, _rel_pos(sd[prefix + "rel_pos_w"], w))
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (b, n, h, w, kh, kw)
    scores = scores + bias.reshape(b, heads, h * w, h * w)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, h, w, c)
    return F.linear(out, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])


def reference_vit(sd, x, heads, depth, window, window_blocks, patch=16, eps=1e-6):
    """A plain ViTDet ViT (residual blocks) from its state dict ``sd``, written independently of
    rev_det: patch embedding, absolute positions resized bicubically from the pre-training grid
    (class token dropped), blocks ``x + attn(norm1(x))`` (window attention on zero-padded
    windows in ``window_blocks``), ``x + mlp(norm2(x))``; output (B, C, H, W)."""
    x = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.permute(0, 2, 3, 1)
    pos = sd["pos_embed"][:, 1:]
    side = math.isqrt(pos.shape[1])
    pos = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=x.shape[1:3], mode="bicubic", align_corners=False)
    x = x + pos.permute(0, 2, 3, 1)
    b, h, w, c = x.shape
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        if i in window_blocks:
            ph, pw = -h % window, -w % window
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            hp, wp = h + ph, w + pw
            y = y.reshape(b, hp // window, window, wp // window, window, c)
            y = y.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)
            y = _attention(y, sd, p + "attn.", heads)
            y = y.reshape(b, hp // window, wp // window, window, window, c)
            y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            y = _attention(y, sd, p + "attn.", heads)
        x = x + y
        y = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        y = F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        x = x + F.linear(F.gelu(y), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return x.permute(0, 3, 1, 2)


class ReferenceViT(Backbone):
    """:func:`reference_vit` as a Detectron2 backbone holding a copy of a RevViTDet's weights."""

    def __init__(self, trunk: RevViTDet, heads, depth, window, window_blocks):
        super().__init__()
        self.state = {k: v.clone() for k, v in trunk.state_dict().items()}
        self.args = (heads, depth, window, window_blocks)
        self.channels = trunk.output_shape()["last_feat"].channels

    def forward(self, x):
        return {"last_feat": reference_vit(self.state, x, *self.args)}

    def output_shape(self):
        return {"last_feat": ShapeSpec(channels=self.channels, stride=16)}


def tiny_trunk(**kw):
    torch.manual_seed(0)
    return randomize(RevViTDet(**dict(TINY, **kw)).double())


def test_at_1_0_the_trunk_is_the_plain_vit_float64():
    trunk = tiny_trunk().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    want = reference_vit(trunk.state_dict(), x, 2, 4, 3, (0, 2))
    with torch.no_grad():
        got = trunk(x)["last_feat"]
    assert got.shape == (2, 48, 4, 4)
    assert rel_err(got, want) < 1e-10
    # Another coupling is another function: the comparison can fail.
    for coupling in trunk.couplings():
        coupling.set(0.5, 0.5)
    with torch.no_grad():
        assert rel_err(trunk(x)["last_feat"], want) > 1e-3


def test_at_1_0_training_gradients_are_the_plain_vits():
    """In training (no drop path), checkpoint mode gives the plain ViT's gradients."""
    trunk = tiny_trunk(drop_path_rate=0.0).train()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    weights = {k: v.clone().requires_grad_() for k, v in trunk.state_dict().items()}
    reference_vit(weights, x, 2, 4, 3, (0, 2)).square().sum().backward()
    trunk.backprop = "checkpoint"
    trunk(x)["last_feat"].square().sum().backward()
    for name, p in trunk.named_parameters():
        assert rel_err(p.grad, weights[name].grad) < 1e-10, name


# ViTDet's pyramid parameters with norm "LN" (Detectron2 main's SimpleFeaturePyramid): per level,
# the resampling (deconvolutions, LN; a max-pool at p5) then a 1x1 and a 3x3 conv without bias,
# each with its norm.
_CONV = ["weight", "norm.weight", "norm.bias"]
VITDET_PYRAMID = {
    2: ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    + [f"{i}.{k}" for i in (4, 5) for k in _CONV],
    3: ["0.weight", "0.bias"] + [f"{i}.{k}" for i in (1, 2) for k in _CONV],
    4: [f"{i}.{k}" for i in (0, 1) for k in _CONV],
    5: [f"{i}.{k}" for i in (1, 2) for k in _CONV],
}


def vitdet_keys(depth):
    """ViTDet's backbone parameter names in a Mask R-CNN (the model zoo's), for ``depth``."""
    net = ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        net += [f"blocks.{i}.attn.rel_pos_h", f"blocks.{i}.attn.rel_pos_w"]
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            net += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    keys = [f"backbone.net.{k}" for k in net]
    return keys + [
        f"backbone.simfp_{lv}.{k}" for lv, parts in VITDET_PYRAMID.items() for k in parts
    ]


def tiny_detector(seed=0, path=VITDET_B_LAZY):
    """The LazyConfig ``path`` (rev_det's surrogate of ViTDet-B, or ViTDet's own config), shrunk
    (the tiny trunk, 32-channel pyramid and heads, 64-pixel square padding), in float64."""
    cfg = LazyConfig.load(path)
    cfg.model.backbone.net.update(TINY, drop_path_rate=0.0)
    cfg.model.backbone.update(out_channels=32, square_pad=64)
    cfg.model.proposal_generator.head.in_channels = 32
    cfg.model.roi_heads.update(num_classes=5, batch_size_per_image=32)
    heads = cfg.model.roi_heads
    heads.box_head.update(conv_dims=[32, 32], fc_dims=[64], input_shape=ShapeSpec(32, 7, 7))
    heads.box_predictor.update(input_shape=ShapeSpec(channels=64), test_score_thresh=0.0)
    heads.mask_head.update(conv_dims=[32, 32], input_shape=ShapeSpec(32, 14, 14))
    torch.manual_seed(seed)
    return randomize(instantiate(cfg.model), seed).double().eval()


def detections(model, batch):
    with torch.no_grad(), nms_in_score_dtype():  # float64 through Detectron2 v0.6's NMS
        return [r["instances"] for r in model(batch)]


def assert_same_detections(a, b):
    for x, y in zip(a, b):
        assert len(x) == len(y) > 0
        assert torch.equal(x.pred_classes, y.pred_classes)
        assert rel_err(x.pred_boxes.tensor, y.pred_boxes.tensor) < 1e-10
        assert rel_err(x.scores, y.scores) < 1e-10
        assert rel_err(x.pred_masks.double(), y.pred_masks.double()) < 1e-10


def test_detector_equals_a_plain_vit_detector_with_the_same_weights():
    """The whole detector (ViTDet's pyramid and heads on the surrogate) gives a plain ViT
    detector's detections: boxes, scores, classes and masks."""
    model = tiny_detector()
    reference = copy.deepcopy(model)
    reference.backbone.net = ReferenceViT(model.backbone.net, 2, 4, 3, (0, 2))
    batch = [{"image": im["image"].double()} for im in fake_batch(((64, 64), (60, 50)))]
    assert_same_detections(detections(model, batch), detections(reference, batch))


def test_parameter_names_are_vitdets():
    state = tiny_detector().state_dict()
    ours = {k for k in state if k.startswith("backbone.") and ".coupling." not in k}
    assert ours == set(vitdet_keys(4))


def test_vitdet_coco_checkpoint_loads_as_the_whole_detector(tmp_path):
    """A model-zoo ``model_final_*.pkl`` (Detectron2's format: numpy arrays, ``__author__``)
    with ViTDet's names loads every weight of the detector, strictly."""
    source = tiny_detector()
    state = {k: v.numpy() for k, v in source.state_dict().items() if "coupling" not in k}
    path = str(tmp_path / "model_final_vitdet.pkl")
    with open(path, "wb") as f:
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    target = tiny_detector(seed=1)
    assert not torch.equal(target.backbone.net.pos_embed, source.backbone.net.pos_embed)
    AtomicCheckpointer(target, strict_load=True).load(path)
    for key, value in target.state_dict().items():
        if "coupling" not in key:
            assert torch.equal(value, source.state_dict()[key]), key
    batch = [{"image": fake_batch(((64, 64),))[0]["image"].double()}]
    assert_same_detections(detections(target, batch), detections(source, batch))


def mae_state(trunk):
    """A MAE ViT checkpoint's layout of ``trunk``'s weights: ``blocks.*``, ``patch_embed.*``,
    ``pos_embed`` with a class token, plus MAE's ``cls_token`` and final ``norm``, and without
    relative positions (MAE has none)."""
    state = {k: v.clone() for k, v in trunk.state_dict().items()}
    state = {k: v for k, v in state.items() if "rel_pos" not in k and "coupling" not in k}
    width = state["patch_embed.proj.weight"].shape[0]
    state.update(cls_token=torch.zeros(1, 1, width), **{"norm.weight": torch.ones(width)})
    state["norm.bias"] = torch.zeros(width)
    return {"model": state}


def test_mae_weights_load_by_name_matching_query_on_every_detectron2(tmp_path):
    torch.manual_seed(5)
    mae = randomize(RevViTDet(**TINY).double())
    path = str(tmp_path / "mae_pretrain_vit_tiny.pth")
    torch.save(mae_state(mae), path)
    model = tiny_detector()
    AtomicCheckpointer(model).load(path + "?matching_heuristics=True")
    loaded = model.backbone.net.state_dict()
    for key, value in mae.state_dict().items():
        if "rel_pos" not in key and "coupling" not in key:
            assert torch.equal(loaded[key], value), key
    with pytest.raises(ValueError, match="unknown option 'strict'"):
        AtomicCheckpointer(model).load(path + "?strict=True")


def test_checkpoint_of_another_depth_or_width_is_refused_naming_the_fix(tmp_path):
    deeper = RevViTDet(**dict(TINY, depth=5, window_block_indexes=(0,)))
    path = str(tmp_path / "mae_deeper.pth")
    torch.save(mae_state(deeper), path)
    with pytest.raises(ValueError, match=r"width 48 and depth 5 .* width 48 and depth 4.*DEPTH"):
        AtomicCheckpointer(tiny_detector()).load(path + "?matching_heuristics=True")
    wider = RevViTDet(**dict(TINY, embed_dim=64))
    torch.save({"model": {f"backbone.net.{k}": v for k, v in wider.state_dict().items()}}, path)
    with pytest.raises(ValueError, match=r"width 64 and depth 4"):
        AtomicCheckpointer(tiny_detector()).load(path)


# ------------------------------------------------------------- the schedule and the mode switch


class _Trainer:
    def __init__(self, model):
        self.model, self.iter = model, 0
        self.storage = EventStorage()


def test_schedule_moves_every_coupling_linearly_over_the_ramp():
    trunk = RevViTDet(**TINY)
    hook = CouplingSchedule(max_iter=100, alpha=(1.0, 0.0), beta=(0.0, 1.0), ramp=(0.1, 0.5))
    hook.trainer = _Trainer(torch.nn.Sequential(trunk))
    hook.before_train()
    seen = {}
    for it in (0, 10, 20, 30, 50, 99):
        hook.trainer.iter = it
        with hook.trainer.storage:
            hook.before_step()
        seen[it] = {(float(c.alpha), float(c.beta)) for c in trunk.couplings()}
    assert seen[0] == seen[10] == {(1.0, 0.0)}
    assert seen[20] == {(0.75, 0.25)} and seen[30] == {(0.5, 0.5)}
    assert seen[50] == seen[99] == {(0.0, 1.0)}
    assert hook.trainer.storage.latest()["coupling/beta"][0] == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ramp=(0.5, 0.2)), r"MODEL.REV.COUPLING.RAMP .*0 <= start <= end <= 1"),
        (dict(alpha=(1.0,)), r"MODEL.REV.COUPLING.ALPHA = \(1.0,\): give two numbers"),
    ],
)
def test_bad_schedules_name_the_key(kwargs, match):
    cfg = yacs_cfg(VITDET_B_YAML)
    for key, value in kwargs.items():
        cfg.MODEL.REV.COUPLING[key.upper()] = value
    with pytest.raises(ValueError, match=match):
        CouplingSchedule(cfg)


def test_a_schedule_ending_at_beta_0_is_refused_only_for_a_reversible_trunk():
    cfg = yacs_cfg(VITDET_B_YAML, "MODEL.REV.COUPLING.BETA", "(0.0, 0.0)")
    hook = CouplingSchedule(cfg)
    trunk = RevViTDet(**TINY)
    hook.trainer = _Trainer(trunk)
    with pytest.raises(ValueError, match=r"MODEL.REV.COUPLING.BETA = \(0.0, 0.0\) ends at 0.*"):
        hook.before_train()
    trunk.backprop = "autograd"  # the plain ViT, fine-tuned as ViTDet does
    hook.before_train()


def test_reversible_request_runs_checkpoint_until_the_coefficients_allow_it(caplog):
    trunk = RevViTDet(**dict(TINY, drop_path_rate=0.1)).train()
    x = torch.randn(1, 3, 64, 64)
    caplog.set_level(logging.INFO, logger="rev_det.modeling.rev_vitdet")
    for (alpha, beta), mode in [((1.0, 0.0), "checkpoint"), ((0.02, 0.98), "checkpoint")]:
        for c in trunk.couplings():
            c.set(alpha, beta)
        trunk(x)["last_feat"].sum().backward()
        assert trunk.blocks.backprop == mode
    for c in trunk.couplings():
        c.set(0.0, 1.0)
    trunk(x)["last_feat"].sum().backward()
    assert trunk.blocks.backprop == "reversible"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "'checkpoint' at alpha=1" in lines[0]
    assert "'reversible' at alpha=0, beta=1" in lines[1]
    set_backprop(trunk, "autograd")
    trunk(x)
    assert trunk.blocks.backprop == "autograd"


def test_yacs_twin_builds_the_surrogate_in_vitdets_pyramid():
    model = build_model(yacs_cfg(VITDET_B_YAML, "MODEL.DEVICE", "meta"))
    assert type(model.backbone.net).__name__ == "RevViTDet"
    assert "simfp_2" in dict(model.backbone.named_children())
    assert {c.device.type for c in model.backbone.net.couplings()[0].buffers()} == {"meta"}
    message = r"'fpn' is for multi-scale trunks; RevViTDet is single-scale, one-stream"
    with pytest.raises(ValueError, match=message + r": choose 'simple' or 'reversible'"):
        build_model(yacs_cfg(VITDET_B_YAML, "MODEL.DEVICE", "meta", "MODEL.REV.PYRAMID", "fpn"))


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.0), (0.0, 1.0)])
def test_reversible_pyramid_on_the_surrogate_reads_its_last_stream_with_autograds_gradients(
    alpha, beta
):
    """MODEL.REV.PYRAMID "reversible" on RevViTDet: the pyramid reduces ViT's output (the last
    stream, C channels); whatever mode the trunk runs (checkpoint at (1, 0), reversible at
    (0, 1)), the gradients are autograd's."""
    cfg = tiny_cfg("MODEL.BACKBONE.NAME", "build_rev_vitdet_backbone")
    assert cfg.MODEL.REV.PYRAMID == "reversible"
    torch.manual_seed(0)
    backbone = build_model(cfg).backbone.double().train()
    assert backbone.reduce.in_channels == backbone.net.stream_channels == 48
    for c in backbone.net.couplings():
        c.set(alpha, beta)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        want = backbone.reduce(backbone.net(backbone._pad_to_square(x))["last_feat"])
        assert torch.equal(backbone._reduced(*backbone.net.forward_streams(x)), want)
    grads = {}
    for mode in ("autograd", "reversible"):
        set_backprop(backbone, mode)
        backbone.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same drop-path masks
        features = backbone(x)
        sum((f * f.cos()).sum() for f in features.values()).backward()
        grads[mode] = {n: p.grad for n, p in backbone.named_parameters() if p.grad is not None}
    assert backbone.net.blocks.backprop == ("reversible" if beta else "checkpoint")
    assert grads["reversible"].keys() == grads["autograd"].keys()
    for name, grad in grads["autograd"].items():
        assert rel_err(grads["reversible"][name], grad) < 1e-9, name


def test_tiny_surrogate_detector_trains_a_step_in_every_mode():
    cfg = tiny_cfg(
        "MODEL.BACKBONE.NAME", "build_rev_vitdet_backbone", "MODEL.REV.PYRAMID", "simple"
    )
    model = build_model(cfg)
    for mode in ("autograd", "checkpoint", "reversible"):
        set_backprop(model, mode)
        model.zero_grad(set_to_none=True)
        with EventStorage():
            sum(model(fake_batch()).values()).backward()
        assert model.backbone.net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0, mode


# ----------------------------------------------------------------- against Detectron2 main's ViTDet

# ViTDet's own config in an editable source install of Detectron2 main.
D2_TREE = os.path.dirname(os.path.dirname(os.path.abspath(detectron2.__file__)))
MAIN_VITDET_B = os.path.join(D2_TREE, "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py")


@pytest.mark.skipif(not HAS_VITDET, reason="needs Detectron2 main's ViTDet; v0.6 has none")
def test_at_1_0_the_trunk_is_detectron2_mains_vit_float64():
    from detectron2.modeling import ViT

    torch.manual_seed(0)
    theirs = randomize(ViT(**TINY, norm_layer=partial(nn.LayerNorm, eps=1e-6)).double()).eval()
    ours = RevViTDet(**TINY).double().eval()
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected and all(".coupling." in k for k in missing)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ours(x)["last_feat"], theirs(x)["last_feat"]) < 1e-10


@pytest.mark.skipif(
    not os.path.isfile(MAIN_VITDET_B),
    reason="needs Detectron2 main installed editable from its source tree (ViTDet's configs)",
)
def test_vitdets_own_detector_and_the_surrogate_give_the_same_outputs(tmp_path):
    """ViTDet's model from Detectron2 main's mask_rcnn_vitdet_b_100ep.py and rev_det's surrogate
    loaded from its state dict (a model-zoo pickle): the same backbone features (float64) and
    the same detections."""
    theirs = tiny_detector(seed=2, path=MAIN_VITDET_B)
    path = str(tmp_path / "model_final_vitdet.pkl")
    with open(path, "wb") as f:
        state = {k: v.numpy() for k, v in theirs.state_dict().items()}
        pickle.dump({"model": state, "__author__": "Detectron2 Model Zoo"}, f)
    ours = tiny_detector(seed=3)
    AtomicCheckpointer(ours, strict_load=True).load(path)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        got, want = ours.backbone(x), theirs.backbone(x)
    assert set(got) == set(want) == {"p2", "p3", "p4", "p5", "p6"}
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-10, name
    batch = [{"image": im["image"].double()} for im in fake_batch(((64, 64), (60, 50)))]
    assert_same_detections(detections(ours, batch), detections(theirs, batch))


def test_recomputed_pyramid_levels_give_the_same_gradients_and_store_less():
    """With the trunk recomputing, ViTDet's pyramid (``recompute=True``) keeps only the trunk's map
    and its outputs between forward and backward: the same gradients as storing its levels."""
    backbone = tiny_detector().backbone.train()
    for c in backbone.net.couplings():
        c.set(0.0, 1.0)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    results = {}
    for recompute in (False, True):
        backbone.recompute = recompute
        backbone.zero_grad(set_to_none=True)
        with MemoryTracker() as mem:
            features = backbone(x)
            stored = mem.current
            sum((f * f).sum() for f in features.values()).backward()
        results[recompute] = stored, [p.grad.clone() for p in backbone.parameters()]
    (stored, grads), (stored_recomputed, grads_recomputed) = results[False], results[True]
    for a, b in zip(grads_recomputed, grads):
        assert rel_err(a, b) < 1e-10
    assert stored_recomputed < 0.8 * stored


@pytest.mark.parametrize("size", ["b_100ep", "l_100ep", "h_75ep"])
def test_cascade_configs_build_vitdets_cascade_on_the_surrogate(size):
    cfg = LazyConfig.load(
        os.path.join(ROOT, "configs", "COCO", f"cascade_mask_rcnn_rev_vitdet_{size}.py")
    )
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert (
        type(model.roi_heads).__name__ == "CascadeROIHeads" and len(model.roi_heads.box_head) == 3
    )
    assert type(model.backbone.net).__name__ == "RevViTDet" and model.backbone.recompute
    assert cfg.train.coupling.beta[-1] == 1.0


VITDET_DEMO = {
    "yacs": (
        "train_net.py",
        os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vitdet_demo.yaml"),
    ),
    "lazy": (
        "lazyconfig_train_net.py",
        os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vitdet_demo.py"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_entry_points_run_the_schedule_switch_modes_and_resume(entry, datasets_root, tmp_path):
    """Both entry points move the couplings from (1, 0) to (0, 1) over the first 4 iterations
    of an 8-iteration run, back-propagate with "checkpoint", then "reversible" (logged), save
    the coefficients, and a run stopped after 4 iterations and resumed ends with the
    uninterrupted run's weights."""
    script, config = VITDET_DEMO[entry]

    def train(out, max_iter, ramp_end, *extra):
        # The ramp ends at iteration 4 whatever max_iter (it is a fraction of the run); no lr
        # warm-up, whose length is a fraction of the run too.
        if entry == "yacs":
            opts = TINY_YACS + ["MODEL.REV.COUPLING.RAMP", f"(0.0, {ramp_end})"]
            opts += ["SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", out]
            opts += ["SOLVER.WARMUP_ITERS", "0"]
        else:
            opts = TINY_LAZY + [f"train.coupling.ramp=[0.0,{ramp_end}]"]
            opts += [f"train.max_iter={max_iter}", f"train.output_dir={out}"]
            opts += ["train.eval_period=0", "lr_multiplier.warmup_length=0.0"]
            opts += ["lr_multiplier.scheduler.milestones=[3]"]
        return run(script, ["--config-file", config, *extra, *opts], datasets_root)

    whole = str(tmp_path / "whole")
    log = train(whole, 8, 0.5)
    assert "RevViTDet back-propagates with 'checkpoint' at alpha=1, beta=0" in log, log[-4000:]
    assert "RevViTDet back-propagates with 'reversible' at alpha=0, beta=1" in log
    final = torch.load(os.path.join(whole, "model_final.pth"), weights_only=False)["model"]
    assert float(final["backbone.net.blocks.1.coupling.alpha"]) == 0.0
    assert float(final["backbone.net.blocks.1.coupling.beta"]) == 1.0

    # Stopped at 4 (a checkpoint mid-ramp), then resumed with max_iter 8.
    parted = str(tmp_path / "parted")
    train(parted, 4, 1.0)
    middle = torch.load(os.path.join(parted, "model_final.pth"), weights_only=False)["model"]
    assert float(middle["backbone.net.blocks.0.coupling.beta"]) == 0.75  # set at iteration 3
    train(parted, 8, 0.5, "--resume")
    resumed = torch.load(os.path.join(parted, "model_final.pth"), weights_only=False)["model"]
    for key, value in final.items():
        if value.is_floating_point():
            assert rel_err(resumed[key], value) < 1e-5, key
