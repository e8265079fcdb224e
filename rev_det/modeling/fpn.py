"""Detectron2's FPN on a multi-scale reversible trunk, recomputed in backward instead of stored."""

from typing import Dict, Optional

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import FPN

from ..reversible import TrunkModeModule, run_recomputed

__all__ = ["RecomputedFPN"]


class _GivenFeatures(Backbone):
    """A stand-in bottom-up network that returns the features it is given."""

    def __init__(self, shapes: Dict[str, ShapeSpec]):
        super().__init__()
        self._shapes = dict(shapes)

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return features

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self._shapes


class RecomputedFPN(Backbone, TrunkModeModule):
    """A multi-scale trunk followed by Detectron2's FPN whose activations are not stored.

    ::

        images -> net (reversible trunk) -> scale2..scale5 -> fpn -> p2..p6
                                              kept           recomputed in backward

    The FPN's 1x1 lateral convolutions change the width, so the FPN is not invertible; it is
    recomputed instead (``torch.utils.checkpoint``): only its inputs (the trunk's outputs, kept
    for the trunk's own output norms anyway) and its outputs (kept by the heads) stay alive
    between forward and backward. With ``backprop="autograd"`` it is exactly Detectron2's FPN.

    Args:
        net: the trunk, a Backbone with multi-scale outputs (e.g. RevMViT).
        in_features, out_channels, norm, top_block, fuse_type: as Detectron2's ``FPN``.
        backprop: "reversible" or "checkpoint" (recompute the FPN) or "autograd" (store it);
            None follows ``net.backprop`` (as the reversible pyramid does).
    """

    def __init__(
        self,
        net: Backbone,
        in_features,
        out_channels: int,
        norm="",
        top_block=None,
        fuse_type: str = "sum",
        backprop: Optional[str] = None,
    ):
        super().__init__()
        self.net = net
        self.fpn = FPN(
            _GivenFeatures(net.output_shape()),
            in_features,
            out_channels,
            norm=norm,
            top_block=top_block,
            fuse_type=fuse_type,
        )
        self.backprop = backprop  # None follows the trunk's mode

    @property
    def size_divisibility(self) -> int:
        return max(self.fpn.size_divisibility, getattr(self.net, "size_divisibility", 0))

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.fpn.output_shape()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.net(x)
        return run_recomputed(self.recomputes(), self.fpn, features)
