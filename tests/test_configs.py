"""Registration, shipped configs, the backbone + pyramid inside Mask R-CNN, and the optimizer."""

import os

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.modeling import BACKBONE_REGISTRY, build_model
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from helpers import LAZY, YACS, fake_batch, tiny_cfg, yacs_cfg

from rev_det.modeling import set_backprop
from rev_det.solver import build_optimizer, get_optimizer_params
from rev_det.utils.memory import MemoryTracker


def test_backbone_is_registered_by_import():
    assert "build_rev_vit_backbone" in BACKBONE_REGISTRY


@pytest.mark.parametrize("path", YACS, ids=os.path.basename)
def test_every_yacs_config_builds_mask_rcnn(path):
    cfg = yacs_cfg(path, "MODEL.DEVICE", "meta")  # structure only: no weights are allocated
    model = build_model(cfg)
    assert type(model).__name__ == "GeneralizedRCNN"
    assert set(model.backbone.output_shape()) == {"p2", "p3", "p4", "p5", "p6"}
    assert model.roi_heads.mask_on


@pytest.mark.parametrize("path", LAZY, ids=os.path.basename)
def test_every_lazy_config_builds_mask_rcnn(path):
    cfg = LazyConfig.load(path)
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert type(model).__name__ == "GeneralizedRCNN"
    assert set(model.backbone.output_shape()) == {"p2", "p3", "p4", "p5", "p6"}
    cfg.optimizer.params.model = model
    assert len(instantiate(cfg.optimizer).param_groups) > 1
    assert instantiate(cfg.lr_multiplier) is not None


@pytest.mark.parametrize("pyramid", ["reversible", "simple"])
def test_output_shape_matches_outputs_for_odd_image_sizes(pyramid):
    model = build_model(tiny_cfg("MODEL.REV.PYRAMID", pyramid)).eval()
    images = ImageList.from_tensors(
        [torch.randn(3, 200, 249), torch.randn(3, 131, 97)], model.backbone.size_divisibility
    )
    with torch.no_grad():
        features = model.backbone(images.tensor)
    shapes = model.backbone.output_shape()
    assert set(features) == set(shapes) == {"p2", "p3", "p4", "p5", "p6"}
    for name, feat in features.items():
        assert feat.shape[1] == shapes[name].channels
        assert images.tensor.shape[-2] == feat.shape[-2] * shapes[name].stride
        assert images.tensor.shape[-1] == feat.shape[-1] * shapes[name].stride


def test_training_step_and_inference_on_cpu():
    model = build_model(tiny_cfg())
    with EventStorage():
        losses = model(fake_batch())
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    sum(losses.values()).backward()
    trunk = model.backbone.net
    assert trunk.patch_embed.proj.weight.grad.abs().sum() > 0
    assert trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        (result,) = model(fake_batch(((200, 249),)))
    assert result["instances"].image_size == (200, 249)


def test_backbone_gradients_equal_across_backprop_modes_float64():
    model = build_model(tiny_cfg()).backbone.double().train()
    x = torch.randn(1, 3, 128, 192, dtype=torch.float64)
    grads = {}
    for mode in ("autograd", "reversible", "checkpoint"):
        set_backprop(model, mode)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        features = model(x)
        sum((i + 1) * f.square().mean() for i, f in enumerate(features.values())).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()}
    # Some gradients are sums that nearly cancel (a LayerNorm's input gradient sums to zero
    # over its channels), so round-off is judged against the model's largest gradient.
    scale = max(g.abs().max().item() for g in grads["autograd"].values())
    for mode in ("reversible", "checkpoint"):
        assert set(grads[mode]) == set(grads["autograd"])
        for name, ref in grads["autograd"].items():
            torch.testing.assert_close(
                grads[mode][name], ref, rtol=1e-10, atol=1e-10 * scale, msg=f"{mode} {name}"
            )


def backbone_memory(pyramid, backprop, depth=12, size=512):
    """Bytes kept between forward and backward, and the peak of a backbone training step
    (parameter gradients excluded: weights frozen, the image requires grad)."""
    cfg = tiny_cfg(
        "MODEL.REV.PYRAMID", pyramid,
        "MODEL.REVVIT.EMBED_DIM", 192,
        "MODEL.REVVIT.NUM_HEADS", 6,
        "MODEL.REVVIT.DEPTH", depth,
        "MODEL.REVVIT.WINDOW_SIZE", 8,
        "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", [i for i in range(depth) if i % 3 != 2],
        "MODEL.FPN.OUT_CHANNELS", 128,
    )  # fmt: skip
    backbone = build_model(cfg).backbone.train()
    set_backprop(backbone, backprop)
    backbone.requires_grad_(False)
    x = torch.randn(1, 3, size, size, requires_grad=True)
    with MemoryTracker() as mem:
        features = backbone(x)
        stored = mem.current
        sum(f.sum() for f in features.values()).backward()
    return stored, mem.peak


def test_reversible_backbone_stores_a_quarter_of_autograd_simple_activations():
    rev_stored, rev_peak = backbone_memory("reversible", "reversible")
    plain_stored, plain_peak = backbone_memory("simple", "autograd")
    assert rev_stored <= plain_stored / 4, (rev_stored, plain_stored)
    # In backward one pyramid level at a time is rebuilt; that working set sets the peak.
    assert rev_peak <= plain_peak / 2, (rev_peak, plain_peak)


def test_unknown_choices_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"MODEL.REV.BACKPROP = 'fast'.*'reversible'"):
        build_model(tiny_cfg("MODEL.REV.BACKPROP", "fast"))
    with pytest.raises(ValueError, match=r"MODEL.REV.PYRAMID = 'fpn'.*'simple'"):
        build_model(tiny_cfg("MODEL.REV.PYRAMID", "fpn"))
    with pytest.raises(AssertionError, match="Non-existent key: MODEL.REVVIT.WINDOW"):
        tiny_cfg("MODEL.REVVIT.WINDOW", 3)


def test_adamw_layer_decay_and_no_decay_on_positions():
    cfg = tiny_cfg("SOLVER.LR_DECAY_RATE", 0.5, "SOLVER.WEIGHT_DECAY", 0.1)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    net, base = model.backbone.net, cfg.SOLVER.BASE_LR
    depth = cfg.MODEL.REVVIT.DEPTH
    assert group_of[id(net.pos_embed)]["lr"] == pytest.approx(base * 0.5 ** (depth + 1))
    # blocks.1 is layer 2 of depth + 1
    assert group_of[id(net.blocks[1].attn.qkv.weight)]["lr"] == pytest.approx(
        base * 0.5 ** (depth - 1)
    )
    assert group_of[id(model.roi_heads.box_predictor.cls_score.weight)]["lr"] == pytest.approx(base)
    assert group_of[id(net.pos_embed)]["weight_decay"] == 0.0
    assert group_of[id(net.blocks[0].attn.rel_pos_h)]["weight_decay"] == 0.0
    assert group_of[id(net.blocks[0].norm1.weight)]["weight_decay"] == 0.0
    assert group_of[id(net.blocks[0].attn.qkv.weight)]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_flop_count_in_eval_is_equal_across_backprop_modes():
    from fvcore.nn import FlopCountAnalysis

    model = build_model(tiny_cfg()).backbone.eval()
    x = torch.randn(1, 3, 128, 128)
    totals = {}
    for mode in ("reversible", "autograd"):
        set_backprop(model, mode)
        flops = FlopCountAnalysis(model, x)
        flops.unsupported_ops_warnings(False)
        totals[mode] = flops.total()
    assert totals["reversible"] > 1e6
    assert totals["reversible"] == totals["autograd"]


def test_optimizer_params_infer_depth_from_block_names():
    model = build_model(tiny_cfg())
    groups = get_optimizer_params(model, base_lr=1.0, lr_decay_rate=0.5)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == [0.5**k for k in range(tiny_cfg().MODEL.REVVIT.DEPTH + 1, -1, -1)]


def test_lr_decay_treats_only_trunk_blocks_as_depth():
    from rev_det.solver import lr_decay_layer_id

    model = build_model(tiny_cfg())
    depth = tiny_cfg().MODEL.REVVIT.DEPTH
    for name, _ in model.named_parameters():
        if not name.startswith(("backbone.net.", "backbone.net")):
            assert lr_decay_layer_id(name, depth) == depth + 1, name


@pytest.mark.parametrize("path", LAZY, ids=os.path.basename)
def test_every_lazy_config_trains_with_the_resumable_loader(path):
    """configs/common/data.py: --resume continues with the batches of an uninterrupted run."""
    from rev_det.data import build_resumable_train_loader

    cfg = LazyConfig.load(path)
    assert cfg.dataloader.train._target_ is build_resumable_train_loader
    assert cfg.dataloader.train.mapper.image_format == "RGB"


def test_a_new_stem_and_its_projection_take_the_full_lr_not_layer_zeros():
    from helpers import tiny_rev_vit

    def lr_of(net, prefix):
        groups = get_optimizer_params(net, base_lr=1.0, lr_decay_rate=0.5)
        ids = {id(p) for n, p in net.named_parameters() if n.startswith(prefix)}
        lrs = {g["lr"] for g in groups for p in g["params"] if id(p) in ids}
        assert len(lrs) == 1, lrs
        return lrs.pop()

    plain, stem = tiny_rev_vit(depth=4), tiny_rev_vit(depth=4, stem_channels=(8, 16))
    assert lr_of(plain, "patch_embed.proj") == 0.5**5  # layer 0 of 4 blocks: ViT's own weights
    assert lr_of(stem, "patch_embed.stem.0") == 1.0  # not in ViT / MAE weights: trained afresh
    assert lr_of(stem, "patch_embed.proj") == 1.0
    assert lr_of(stem, "blocks.0.") == 0.5**4
