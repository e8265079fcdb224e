"""Detectron2's own ViTDet beside rev_det's detectors: its ``ViT`` + ``SimpleFeaturePyramid``
backbone in rev_det's Mask R-CNN (same RPN and heads), with autograd or activation
checkpointing. Detectron2 v0.6 has no ViTDet; there these builders return None
(:data:`HAS_VITDET` False)."""

from functools import partial
from typing import Optional

from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn
from torch.utils.checkpoint import checkpoint

from rev_det.modeling import build_detector, vit_trunk_args

try:
    from detectron2.modeling import SimpleFeaturePyramid, ViT
except ImportError:  # Detectron2 v0.6
    SimpleFeaturePyramid = ViT = None

__all__ = ["HAS_VITDET", "vitdet_backbone", "vitdet_detector", "vitdet_pyramid"]

#: Whether the installed Detectron2 has ViTDet's ``ViT`` and ``SimpleFeaturePyramid`` (main).
HAS_VITDET = ViT is not None


class _Checkpointed(nn.Module):
    """A block run through ``torch.utils.checkpoint``: its input is stored, the rest recomputed
    in backward (rev_det's "checkpoint" mode does the same per block)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def vitdet_pyramid(net: nn.Module, out_channels: int, square_pad: int = 0) -> Optional[nn.Module]:
    """Detectron2's own ``SimpleFeaturePyramid`` on ``net``'s stride-16 ``"last_feat"``, p2-p6,
    as its ``mask_rcnn_vitdet`` config builds it; None on Detectron2 v0.6.

    Args:
        net: a Detectron2 Backbone with a ``"last_feat"`` output (a ``ViT``).
        out_channels: channels of every level.
        square_pad: pad inputs to a square of this size (0: no square padding).
    """
    if not HAS_VITDET:
        return None
    return SimpleFeaturePyramid(
        net,
        in_feature="last_feat",
        out_channels=out_channels,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(),
        norm="LN",
        square_pad=square_pad,
    )


def vitdet_backbone(cfg, act_checkpoint: bool, size: int) -> Optional[nn.Module]:
    """Detectron2's own ViTDet backbone (``ViT`` + :func:`vitdet_pyramid`) with the trunk sizes
    of ``cfg.MODEL.REVVIT``; None on Detectron2 v0.6.

    With ``act_checkpoint`` every block runs through ``torch.utils.checkpoint``: ViTDet's
    ``use_act_checkpoint`` does the same through fairscale's wrapper (a dependency rev_det does
    not need; Detectron2 marks it "TODO: use torch.utils.checkpoint").
    """
    if not HAS_VITDET:
        return None
    net = ViT(norm_layer=partial(nn.LayerNorm, eps=1e-6), **vit_trunk_args(cfg))
    if act_checkpoint:
        net.blocks = nn.ModuleList(_Checkpointed(block) for block in net.blocks)
    return vitdet_pyramid(net, cfg.MODEL.FPN.OUT_CHANNELS, square_pad=size)


def vitdet_detector(cfg, act_checkpoint: bool, size: int) -> Optional[nn.Module]:
    """The Mask R-CNN of ``cfg`` (a RevViT detector's) with its backbone replaced by
    :func:`vitdet_backbone`, on the config's device; None on Detectron2 v0.6."""
    if not HAS_VITDET:
        return None
    # The detector first, then the backbone: the order in which they draw their initial weights.
    model = build_detector(cfg)
    model.backbone = vitdet_backbone(cfg, act_checkpoint, size).to(model.device)
    return model
