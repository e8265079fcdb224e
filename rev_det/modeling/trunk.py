"""The contract of a single-scale two-stream trunk, which the pyramids build on."""

from typing import Dict, Tuple

import torch
from detectron2.modeling import Backbone

from ..reversible import BackpropModule

__all__ = ["TwoStreamTrunk"]


class TwoStreamTrunk(Backbone, BackpropModule):
    """A single-scale reversible trunk: two streams out, fused into one feature map.

    ::

        images -> forward_streams -> x1, x2 (B, C, H/t, W/t)  the reversible output, kept
                                       | fuse
                                     (B, F, H/t, W/t)         ``forward()``: {name: this}

    :class:`~rev_det.modeling.ReversibleFeaturePyramid` takes the streams (it re-runs ``fuse``
    per level instead of storing the fused map); :class:`~rev_det.modeling.SimpleFeaturePyramid`
    takes ``forward()``'s map. Subclasses implement :meth:`forward_streams` and :meth:`fuse`, and
    set ``_out_features`` (one name), ``_out_feature_channels`` (F: 2C for RevViT's concatenation;
    a trunk whose map is one stream, such as RevViTDet, overrides :attr:`stream_channels`) and
    ``_out_feature_strides`` (t); their blocks run in ``self.blocks`` (a
    :class:`~rev_det.reversible.ReversibleSequence`), which holds the backprop mode: the trunk's
    ``backprop`` reads and sets that one value.
    """

    @property
    def backprop(self) -> str:
        return self.blocks.backprop

    @backprop.setter
    def backprop(self, mode: str):
        self.blocks.backprop = mode

    def forward_streams(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two streams after the last block, each (B, C, H / t, W / t)."""
        raise NotImplementedError

    def fuse(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The trunk's output map (B, F, H / t, W / t) from its two streams."""
        raise NotImplementedError

    @property
    def stream_channels(self) -> int:
        """C, the width of each stream (half the fused map's, unless a subclass says)."""
        return self._out_feature_channels[self._out_features[0]] // 2

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {self._out_features[0]: self.fuse(*self.forward_streams(x))}
