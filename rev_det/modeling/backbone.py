"""Detectron2 builders for rev_det's backbones (registered in BACKBONE_REGISTRY)."""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from PIL import Image
from torch import nn

from ..config import PYRAMIDS, check_choice
from ..reversible import BackpropModule, check_backprop
from ..solver import expect_optimizer
from .fpn import RecomputedFPN
from .layers import resolve_norm
from .pyramid import ReversibleFeaturePyramid, SimpleFeaturePyramid
from .rev_mvit import RevMViT
from .rev_vit import RevViT

__all__ = [
    "build_rev_vit_backbone",
    "build_rev_mvit_backbone",
    "build_pyramid",
    "set_backprop",
    "vit_trunk_args",
]


def build_pyramid(cfg, net: Backbone) -> Backbone:
    """Wrap a single-scale reversible trunk in the pyramid that ``cfg.MODEL.REV.PYRAMID`` names.

    The pyramids' default levels are p2-p5 (strides 4-32) whatever the trunk's stride (its patch
    size); p6 comes from max-pooling p5, as Mask R-CNN's heads and anchors expect.
    """
    kind = check_choice("MODEL.REV.PYRAMID", cfg.MODEL.REV.PYRAMID, PYRAMIDS)
    if kind == "fpn":
        raise ValueError(
            "MODEL.REV.PYRAMID = 'fpn' needs a multi-scale trunk (RevMViT); RevViT is single-scale: "
            "use 'reversible' or 'simple'."
        )
    common = dict(
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        top_block=LastLevelMaxPool(),
        norm=cfg.MODEL.FPN.NORM or "LN",
        square_pad=cfg.MODEL.REV.SQUARE_PAD,
    )
    if kind == "simple":
        # From the stream width, as ViTDet's pyramid from its ViT's width.
        name = net._out_features[0]
        return SimpleFeaturePyramid(net, in_feature=name, width=net.stream_channels, **common)
    return ReversibleFeaturePyramid(net, num_blocks=cfg.MODEL.REV.PYRAMID_BLOCKS, **common)


def _check_input_format(cfg, channels: int):
    """Raise if the images ``cfg.INPUT.FORMAT`` reads cannot feed a ``channels``-channel model.

    Detectron2's DatasetMapper converts every file to INPUT.FORMAT (under "RGB" an RGBA or
    grayscale PNG becomes RGB), and GeneralizedRCNN normalises by MODEL.PIXEL_MEAN/PIXEL_STD,
    whose length is the model's channel count. A one-channel image is broadcast over the means,
    which equals converting it to RGB first; any other mismatch would only stop at the first
    image, in that normalisation, with a tensor shape error.
    """
    fmt = cfg.INPUT.FORMAT
    try:
        # Detectron2 reads BGR and YUV-BT.601 through RGB; every other format is a PIL mode.
        bands = 3 if fmt in ("BGR", "YUV-BT.601") else Image.getmodebands(fmt)
    except KeyError:
        raise ValueError(
            f"INPUT.FORMAT = {fmt!r} is not an image format Detectron2 reads; use 'RGB', 'BGR', "
            "'YUV-BT.601' or a PIL mode such as 'L'."
        ) from None
    if bands not in (1, channels):
        raise ValueError(
            f"INPUT.FORMAT = {fmt!r} gives {bands}-channel images but the model takes {channels} "
            "(the length of MODEL.PIXEL_MEAN); set INPUT.FORMAT to 'RGB' (Detectron2 converts "
            f"RGBA and grayscale files to it) or give MODEL.PIXEL_MEAN/PIXEL_STD {bands} values."
        )


def set_backprop(model: nn.Module, mode: str) -> nn.Module:
    """Switch every reversible part of ``model`` (trunks and pyramids) to backprop ``mode``.

    The parameters stay the same, so one model can be measured in all three modes.
    """
    check_backprop(mode)
    for module in model.modules():
        if isinstance(module, BackpropModule):
            module.backprop = mode
    return model


def vit_trunk_args(cfg) -> dict:
    """The arguments ``cfg.MODEL.REVVIT`` gives a ViT-shaped trunk: RevViT's, and those of
    Detectron2's own ``ViT`` that share its names (the benchmarks build ViTDet from them)."""
    c = cfg.MODEL.REVVIT
    return dict(
        img_size=c.IMG_SIZE,
        patch_size=c.PATCH_SIZE,
        embed_dim=c.EMBED_DIM,
        depth=c.DEPTH,
        num_heads=c.NUM_HEADS,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        drop_path_rate=c.DROP_PATH_RATE,
        use_abs_pos=c.USE_ABS_POS,
        use_rel_pos=c.USE_REL_POS,
        window_size=c.WINDOW_SIZE,
        window_block_indexes=tuple(c.WINDOW_BLOCK_INDEXES),
        pretrain_img_size=c.PRETRAIN_IMG_SIZE,
        pretrain_use_cls_token=c.PRETRAIN_USE_CLS_TOKEN,
    )


@BACKBONE_REGISTRY.register()
def build_rev_vit_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """RevViT + pyramid adapter (p2-p6) from ``cfg.MODEL.REVVIT`` and ``cfg.MODEL.REV``."""
    _check_input_format(cfg, input_shape.channels)
    net = RevViT(
        in_chans=input_shape.channels,
        **vit_trunk_args(cfg),
        stem_channels=tuple(cfg.MODEL.REVVIT.STEM_CHANNELS),
        stem_norm=cfg.MODEL.REVVIT.STEM_NORM,
        backprop=check_backprop(cfg.MODEL.REV.BACKPROP, "MODEL.REV.BACKPROP"),
        parallel_backward=cfg.MODEL.REV.PARALLEL_BACKWARD,
    )
    return expect_optimizer(build_pyramid(cfg, net), cfg.SOLVER.OPTIMIZER)


@BACKBONE_REGISTRY.register()
def build_rev_mvit_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """RevMViT + FPN (p2-p6) from ``cfg.MODEL.REVMVIT`` and ``cfg.MODEL.REV``.

    ``MODEL.REV.PYRAMID`` "fpn" is Detectron2's FPN; "reversible" the same FPN recomputed in
    backward (:class:`RecomputedFPN`).
    """
    _check_input_format(cfg, input_shape.channels)
    if cfg.MODEL.REV.SQUARE_PAD:
        raise ValueError(
            "MODEL.REV.SQUARE_PAD applies to RevViT's pyramids (a fixed square grid for its "
            "absolute position embeddings); RevMViT's FPN pads to its size divisibility only: "
            "set MODEL.REV.SQUARE_PAD to 0."
        )
    c = cfg.MODEL.REVMVIT
    backprop = check_backprop(cfg.MODEL.REV.BACKPROP, "MODEL.REV.BACKPROP")
    net = RevMViT(
        img_size=c.IMG_SIZE,
        in_chans=input_shape.channels,
        embed_dim=c.EMBED_DIM,
        depth=c.DEPTH,
        num_heads=c.NUM_HEADS,
        last_block_indexes=tuple(c.LAST_BLOCK_INDEXES),
        adaptive_kv_stride=c.ADAPTIVE_KV_STRIDE,
        adaptive_window_size=c.ADAPTIVE_WINDOW_SIZE,
        residual_pooling=c.RESIDUAL_POOLING,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        drop_path_rate=c.DROP_PATH_RATE,
        use_abs_pos=c.USE_ABS_POS,
        use_rel_pos=c.USE_REL_POS,
        backprop=backprop,
        parallel_backward=cfg.MODEL.REV.PARALLEL_BACKWARD,
        out_features=tuple(c.OUT_FEATURES),
    )
    kind = check_choice("MODEL.REV.PYRAMID", cfg.MODEL.REV.PYRAMID, PYRAMIDS)
    if kind == "simple":
        raise ValueError(
            "MODEL.REV.PYRAMID = 'simple' (ViTDet's single-scale pyramid) does not apply to "
            "RevMViT, which is multi-scale: use 'reversible' or 'fpn'."
        )
    fpn_args = dict(
        in_features=list(c.OUT_FEATURES),
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=resolve_norm(cfg.MODEL.FPN.NORM),
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    if kind == "fpn":
        backbone = FPN(bottom_up=net, **fpn_args)
    else:
        backbone = RecomputedFPN(net, backprop=backprop, **fpn_args)
    return expect_optimizer(backbone, cfg.SOLVER.OPTIMIZER)
