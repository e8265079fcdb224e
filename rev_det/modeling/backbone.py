"""Detectron2 builders for rev_det's backbones (registered in BACKBONE_REGISTRY)."""

from typing import Callable, Dict, Tuple

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from PIL import Image

from ..optimizer_guard import expect_optimizer
from ..reversible import set_backprop
from .fpn import RecomputedFPN
from .layers import resolve_norm
from .pyramid import ReversibleFeaturePyramid, SimpleFeaturePyramid
from .rev_mvit import RevMViT
from .rev_vit import RevViT
from .rev_vitdet import RevViTDet
from .trunk import TwoStreamTrunk

__all__ = [
    "build_backbone",
    "build_rev_vit_backbone",
    "build_rev_vitdet_backbone",
    "build_rev_mvit_backbone",
    "build_pyramid",
    "PYRAMIDS",
    "set_backprop",
]


def _pyramid_args(cfg) -> dict:
    """What every pyramid takes from ``cfg.MODEL.FPN``: its width and its p6."""
    return dict(out_channels=cfg.MODEL.FPN.OUT_CHANNELS, top_block=LastLevelMaxPool())


def _single_scale_args(cfg) -> dict:
    """What both pyramids of a single-scale trunk take: a LayerNorm by default, a square pad."""
    return dict(
        norm=cfg.MODEL.FPN.NORM or "LN", square_pad=cfg.MODEL.REV.SQUARE_PAD, **_pyramid_args(cfg)
    )


def _reversible_pyramid(cfg, net: TwoStreamTrunk) -> Backbone:
    return ReversibleFeaturePyramid(
        net, num_blocks=cfg.MODEL.REV.PYRAMID_BLOCKS, **_single_scale_args(cfg)
    )


def _simple_pyramid(cfg, net: TwoStreamTrunk) -> Backbone:
    # From the stream width, as ViTDet's pyramid from its ViT's width.
    return SimpleFeaturePyramid(
        net, in_feature=net._out_features[0], width=net.stream_channels, **_single_scale_args(cfg)
    )


def _vitdet_pyramid(cfg, net: RevViTDet) -> Backbone:
    # ViTDet's own pyramid on the trunk's one stream (its sub-modules named as ViTDet's, so
    # ViTDet's COCO checkpoints load whole), its levels recomputed in backward with the trunk.
    return SimpleFeaturePyramid(
        net, in_feature=net._out_features[0], recompute=True, **_single_scale_args(cfg)
    )


def _fpn_args(cfg, net: Backbone) -> dict:
    """Detectron2's FPN arguments on every feature of a multi-scale trunk."""
    if cfg.MODEL.REV.SQUARE_PAD:
        raise ValueError(
            "MODEL.REV.SQUARE_PAD applies to RevViT's pyramids (a fixed square grid for its "
            "absolute position embeddings); RevMViT's FPN pads to its size divisibility only: "
            "set MODEL.REV.SQUARE_PAD to 0."
        )
    return dict(
        in_features=list(net._out_features),
        norm=resolve_norm(cfg.MODEL.FPN.NORM),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        **_pyramid_args(cfg),
    )


def _fpn(cfg, net: Backbone) -> Backbone:
    return FPN(bottom_up=net, **_fpn_args(cfg, net))


def _recomputed_fpn(cfg, net: Backbone) -> Backbone:
    return RecomputedFPN(net, **_fpn_args(cfg, net))  # in its trunk's mode


# The pyramid of each (trunk kind, MODEL.REV.PYRAMID): the one place that pairs them. A
# single-scale trunk is a TwoStreamTrunk (RevViT, or a new trunk of that contract); ViTDet's
# pyramid and rev_det's reversible one resample its one map. RevViTDet, ViTDet's ViT as a
# surrogate, gives ViT's one map (its last stream) and feeds ViTDet's pyramid, or the reversible
# one at the stream width. A multi-scale trunk (RevMViT) feeds Detectron2's FPN, or the same FPN
# recomputed in backward. Every pyramid gives p2-p5 (strides 4-32) whatever the trunk's stride,
# and p6 by max-pooling p5, as Mask R-CNN's heads expect.
PYRAMIDS: Dict[Tuple[str, str], Callable[..., Backbone]] = {
    ("single-scale", "reversible"): _reversible_pyramid,
    ("single-scale", "simple"): _simple_pyramid,
    ("single-scale, one-stream", "simple"): _vitdet_pyramid,
    ("single-scale, one-stream", "reversible"): _reversible_pyramid,
    ("multi-scale", "reversible"): _recomputed_fpn,
    ("multi-scale", "fpn"): _fpn,
}


def build_pyramid(cfg, net: Backbone) -> Backbone:
    """Wrap a trunk in the pyramid (p2-p6) that ``cfg.MODEL.REV.PYRAMID`` names for its kind.

    Args:
        cfg: a Detectron2 config with rev_det's keys.
        net: a single-scale :class:`TwoStreamTrunk`, a :class:`RevViTDet` or a multi-scale trunk
            (RevMViT).

    Returns:
        Backbone: the pyramid around ``net``, as :data:`PYRAMIDS` builds it.
    """
    if isinstance(net, RevViTDet):
        kind = "single-scale, one-stream"
    else:
        kind = "single-scale" if isinstance(net, TwoStreamTrunk) else "multi-scale"
    name = cfg.MODEL.REV.PYRAMID
    build = PYRAMIDS.get((kind, name))
    if build is None:
        valid = " or ".join(repr(p) for k, p in PYRAMIDS if k == kind)
        other = [k for k, p in PYRAMIDS if p == name]
        why = f"is for {other[0]} trunks" if other else "is not valid"
        raise ValueError(
            f"MODEL.REV.PYRAMID = {name!r} {why}; {type(net).__name__} is {kind}: choose {valid}."
        )
    return build(cfg, net)


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


def build_backbone(trunk: type, cfg, input_shape: ShapeSpec) -> Backbone:
    """The builder every rev_det backbone uses: a trunk in the pyramid ``cfg`` names.

    Checks ``INPUT.FORMAT`` against the trunk's input channels, builds ``trunk`` from its
    ``from_config(cfg, input_shape)``, wraps it in the pyramid ``MODEL.REV.PYRAMID`` names for
    its kind (:func:`build_pyramid`), and registers the optimizer guard
    (:mod:`rev_det.optimizer_guard`, unless ``SOLVER.CHECK_OPTIMIZER`` is off). A new trunk's
    registered builder is one line: ``return build_backbone(MyTrunk, cfg, input_shape)``.

    Args:
        trunk: the trunk class (a :class:`TwoStreamTrunk`, or a multi-scale Backbone).
        cfg: a Detectron2 config with rev_det's keys.
        input_shape: the images' shape.

    Returns:
        Backbone: p2-p6.
    """
    _check_input_format(cfg, input_shape.channels)
    net = trunk(**trunk.from_config(cfg, input_shape))
    backbone = build_pyramid(cfg, net)
    if cfg.SOLVER.CHECK_OPTIMIZER:
        expect_optimizer(backbone, cfg.SOLVER.OPTIMIZER)
    return backbone


@BACKBONE_REGISTRY.register()
def build_rev_vit_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """RevViT (:meth:`RevViT.from_config`) in the pyramid ``MODEL.REV.PYRAMID`` names: p2-p6."""
    return build_backbone(RevViT, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_rev_vitdet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """RevViTDet (:meth:`RevViTDet.from_config`, ViTDet's ViT as a reversible surrogate) in
    ViTDet's simple feature pyramid (``MODEL.REV.PYRAMID "simple"``) or rev_det's reversible one
    (``"reversible"``): p2-p6."""
    return build_backbone(RevViTDet, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_rev_mvit_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """RevMViT (:meth:`RevMViT.from_config`) in the FPN ``MODEL.REV.PYRAMID`` names: p2-p6."""
    return build_backbone(RevMViT, cfg, input_shape)
