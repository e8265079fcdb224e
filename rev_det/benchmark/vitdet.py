"""Detectron2's own ViTDet beside rev_det's detectors: its ``ViT`` + ``SimpleFeaturePyramid``
backbone in rev_det's Mask R-CNN (same RPN and heads), with autograd or activation
checkpointing. Detectron2 v0.6 has no ViTDet; there these builders return None."""

from functools import partial
from typing import Optional

from detectron2.modeling import build_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from rev_det.modeling import vit_trunk_args

__all__ = ["vitdet_backbone", "vitdet_detector"]


class _Checkpointed(nn.Module):
    """A block run through ``torch.utils.checkpoint``: its input is stored, the rest recomputed
    in backward (rev_det's "checkpoint" mode does the same per block)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def vitdet_backbone(cfg, act_checkpoint: bool, size: int) -> Optional[nn.Module]:
    """Detectron2's own ViTDet backbone (``ViT`` + ``SimpleFeaturePyramid``, as its
    ``mask_rcnn_vitdet`` config builds them) with the trunk sizes of ``cfg.MODEL.REVVIT``; None
    on a Detectron2 without ViTDet (v0.6).

    With ``act_checkpoint`` every block runs through ``torch.utils.checkpoint``: ViTDet's
    ``use_act_checkpoint`` does the same through fairscale's wrapper (a dependency rev_det does
    not need; Detectron2 marks it "TODO: use torch.utils.checkpoint").
    """
    try:
        from detectron2.modeling import SimpleFeaturePyramid, ViT
    except ImportError:
        return None
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    net = ViT(norm_layer=partial(nn.LayerNorm, eps=1e-6), **vit_trunk_args(cfg))
    if act_checkpoint:
        net.blocks = nn.ModuleList(_Checkpointed(block) for block in net.blocks)
    return SimpleFeaturePyramid(
        net,
        in_feature="last_feat",
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(),
        norm="LN",
        square_pad=size,
    )


def vitdet_detector(cfg, act_checkpoint: bool, size: int) -> Optional[nn.Module]:
    """The Mask R-CNN of ``cfg`` (a RevViT detector's) with its backbone replaced by
    :func:`vitdet_backbone`, on the config's device; None on Detectron2 v0.6."""
    # The detector first, then the backbone: the order in which they draw their initial weights.
    model = build_model(cfg)
    backbone = vitdet_backbone(cfg, act_checkpoint, size)
    if backbone is None:
        return None
    model.backbone = backbone.to(model.device)
    return model
