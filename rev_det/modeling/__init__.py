"""rev_det's models. Importing this module registers the backbones in BACKBONE_REGISTRY."""

from .backbone import (
    PYRAMIDS,
    build_backbone,
    build_pyramid,
    build_rev_mvit_backbone,
    build_rev_vit_backbone,
    build_rev_vitdet_backbone,
    set_backprop,
)
from .fpn import RecomputedFPN
from .heads import build_detector, recompute_heads
from .layers import LayerNorm2d, get_norm
from .pyramid import ReversibleFeaturePyramid, SimpleFeaturePyramid
from .rev_mvit import REVMVIT_PAPER_OPTIONS, REVMVIT_SIZES, RevMViT
from .rev_vit import REVVIT_SIZES, RevViT, vit_trunk_args
from .rev_vitdet import RevViTDet
from .trunk import TwoStreamTrunk
from .trunk_args import backprop_args, size_args

__all__ = [
    "RevViT",
    "REVVIT_SIZES",
    "RevViTDet",
    "RevMViT",
    "REVMVIT_PAPER_OPTIONS",
    "REVMVIT_SIZES",
    "TwoStreamTrunk",
    "RecomputedFPN",
    "SimpleFeaturePyramid",
    "ReversibleFeaturePyramid",
    "LayerNorm2d",
    "get_norm",
    "build_rev_vit_backbone",
    "build_rev_vitdet_backbone",
    "build_rev_mvit_backbone",
    "build_backbone",
    "build_pyramid",
    "PYRAMIDS",
    "size_args",
    "backprop_args",
    "set_backprop",
    "vit_trunk_args",
    "recompute_heads",
    "build_detector",
]
