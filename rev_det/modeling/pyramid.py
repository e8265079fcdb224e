"""Pyramid adapters from a stride-16 trunk to the p2-p6 pyramid of Mask R-CNN.

* :class:`SimpleFeaturePyramid`: ViTDet's adapter on the trunk's fused map, activations stored
  (the baseline of every comparison).
* :class:`ReversibleFeaturePyramid`: the same outputs (names, widths, strides) from the trunk's
  two reversible streams, with its internal activations rebuilt or recomputed in backward
  instead of stored.
"""

import logging
import math
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import check_choice
from ..reversible import BACKPROP_MODES, ReversibleBlock, reversible_sequence
from .layers import get_norm

__all__ = ["SimpleFeaturePyramid", "ReversibleFeaturePyramid"]

logger = logging.getLogger(__name__)

Norm = Union[str, Callable[[int], nn.Module], None]

# Resampling of the stride-16 trunk output per level: p2, p3, p4, p5.
SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)


class _PyramidBase(Backbone):
    """Output names, strides and padding of a pyramid built on one stride-``in_stride`` map."""

    def _init_outputs(
        self,
        in_stride: int,
        scale_factors: Sequence[float],
        out_channels: int,
        top_block: Optional[nn.Module],
        square_pad: int,
    ):
        for scale in scale_factors:
            if scale not in SCALE_FACTORS:
                raise ValueError(f"scale factor {scale} is not one of {SCALE_FACTORS}.")
        strides = [int(in_stride / scale) for scale in scale_factors]
        self._out_features = [f"p{int(math.log2(s))}" for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self.top_block = top_block
        if top_block is not None:
            # As Detectron2's FPN: the top block reads one of the levels, by name.
            if top_block.in_feature not in self._out_features:
                raise ValueError(
                    f"top_block reads {top_block.in_feature!r}, which is not one of the levels "
                    f"{self._out_features} of these scale factors."
                )
            last = int(math.log2(strides[-1]))
            for i in range(1, top_block.num_levels + 1):
                self._out_features.append(f"p{last + i}")
                self._out_feature_strides[f"p{last + i}"] = 2 ** (last + i)
        self._out_feature_channels = {name: out_channels for name in self._out_features}
        self._size_divisibility = max(self._out_feature_strides.values())
        self._square_pad = square_pad

    @property
    def size_divisibility(self) -> int:
        """Inputs must be padded to a multiple of the coarsest stride (64 with p6)."""
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        """The padding Detectron2 main's GeneralizedRCNN asks ``ImageList.from_tensors`` for.

        The key is spelled as ``from_tensors`` reads it; Detectron2 main's own
        SimpleFeaturePyramid misspells it, so there only ``square_size`` pads correctly.
        """
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def _add_top_block(self, levels: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        if self.top_block is not None:
            source = levels[self._out_features.index(self.top_block.in_feature)]
            levels = levels + list(self.top_block(source))
        return dict(zip(self._out_features, levels))


class SimpleFeaturePyramid(_PyramidBase):
    """ViTDet's simple feature pyramid: deconvolutions and pooling of one stride-16 map.

    Per scale factor, on the trunk's ``C``-channel map:

    * 4: ConvTranspose(C, C/2, 2, 2) + norm + GELU + ConvTranspose(C/2, C/4, 2, 2);
    * 2: ConvTranspose(C, C/2, 2, 2);
    * 1: nothing;
    * 0.5: MaxPool(2);

    then 1x1 conv to ``out_channels`` + norm and 3x3 conv + norm. Sub-modules are named as in
    ViTDet (``net``, ``simfp_{2..5}``, ``top_block``), so its checkpoints load by name. Every
    activation is stored for backward.

    Args:
        net: the trunk, a Backbone with a stride-16 output named ``in_feature``.
        in_feature: the trunk output to build the pyramid from.
        out_channels: channels of every output level.
        scale_factors: resampling of the trunk output per level, among 4, 2, 1 and 0.5.
        top_block: extra coarser levels computed from one level (``LastLevelMaxPool``: p6
            from p5), or None for none. It holds no state, so the default instance is shared.
        norm: "LN", a Detectron2 norm name, a callable taking the channel count, or "".
        square_pad: pad inputs to a square of this size (0: to ``size_divisibility`` only).
    """

    def __init__(
        self,
        net: Backbone,
        in_feature: str = "last_feat",
        out_channels: int = 256,
        scale_factors: Sequence[float] = SCALE_FACTORS,
        top_block: Optional[nn.Module] = LastLevelMaxPool(),
        norm: Norm = "LN",
        square_pad: int = 0,
    ):
        super().__init__()
        self.net = net
        self.in_feature = in_feature
        in_shape = net.output_shape()[in_feature]
        self._init_outputs(in_shape.stride, scale_factors, out_channels, top_block, square_pad)
        dim = in_shape.channels
        self.stages = []
        for scale, name in zip(scale_factors, self._out_features):
            layers, width = self._resample(scale, dim, norm)
            layers += [
                Conv2d(width, out_channels, 1, bias=not norm, norm=get_norm(norm, out_channels)),
                Conv2d(
                    out_channels,
                    out_channels,
                    3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, out_channels),
                ),
            ]
            stage = nn.Sequential(*layers)
            self.add_module(f"simfp_{name[1:]}", stage)
            self.stages.append(stage)

    @staticmethod
    def _resample(scale: float, dim: int, norm: Norm):
        """The layers that bring the ``dim``-channel map to ``scale``, and their output width."""
        if scale == 4.0:
            if dim % 4:
                raise ValueError(f"scale factor 4 needs the trunk width {dim} divisible by 4.")
            layers = [
                nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
                get_norm(norm, dim // 2),
                nn.GELU(),
                nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
            ]
            return [layer for layer in layers if layer is not None], dim // 4
        if scale == 2.0:
            if dim % 2:
                raise ValueError(f"scale factor 2 needs the trunk width {dim} divisible by 2.")
            return [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
        if scale == 1.0:
            return [], dim
        return [nn.MaxPool2d(2, stride=2)], dim

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.net(x)[self.in_feature]
        return self._add_top_block([stage(features) for stage in self.stages])


def _norm_or_identity(norm: Norm, channels: int) -> nn.Module:
    module = get_norm(norm, channels)
    return nn.Identity() if module is None else module


class _Coupling(ReversibleBlock):
    """``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)`` on two maps; F and G: norm, GELU, 3x3 conv.

    The branches are pre-activation (norm and GELU before the convolution), so that what they
    add to the stream is a linear map of any sign rather than a GELU output, which is
    mostly positive.
    """

    def __init__(self, channels: int, norm: Norm):
        super().__init__()
        self.f_norm = _norm_or_identity(norm, channels)
        self.f_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.g_norm = _norm_or_identity(norm, channels)
        self.g_conv = nn.Conv2d(channels, channels, 3, padding=1)

    def F(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the engine's name)
        return self.f_conv(F.gelu(self.f_norm(x)))

    def G(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the engine's name)
        return self.g_conv(F.gelu(self.g_norm(x)))


class _Level(nn.Module):
    """One level of :class:`ReversibleFeaturePyramid` from the trunk's two streams."""

    def __init__(
        self, scale: float, in_channels: int, out_channels: int, num_blocks: int, norm: Norm
    ):
        super().__init__()
        # A learned resampling of the fused map, as ViTDet's deconvolutions: a 1x1 conv at
        # stride 16 then depth-to-space (together a transposed conv with kernel = stride = s,
        # and faster than one on CPU), or space-to-depth then a 1x1 conv (a 2x2 stride-2
        # conv). Parameter-free depth-to-space of each stream instead would leave a p2 pixel
        # 1/16 of the trunk's channels to read.
        if scale == 0.5:
            layers = [nn.PixelUnshuffle(2), nn.Conv2d(4 * in_channels, out_channels, 1)]
        elif scale == 1.0:
            layers = [nn.Conv2d(in_channels, out_channels, 1)]
        else:
            factor = int(scale)
            layers = [
                nn.Conv2d(in_channels, out_channels * factor**2, 1),
                nn.PixelShuffle(factor),
            ]
        self.resample = nn.Sequential(*layers)
        # Named "couplings", not "blocks": the optimizer's layer-wise lr decay takes
        # "blocks.{i}." for trunk block i.
        self.couplings = nn.ModuleList(
            _Coupling(out_channels // 2, norm) for _ in range(num_blocks)
        )
        self.norm = _norm_or_identity(norm, out_channels)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, fuse, backprop: str) -> torch.Tensor:
        # The trunk's fusion normalises the streams; it is cheap at stride 16, so each level
        # recomputes it rather than keeping one copy for all of them. No norm follows the
        # resampling: the couplings normalise what they read, and a norm there would keep one
        # more full-size map in the backward working set.
        h1, h2 = self.resample(fuse(x1, x2)).chunk(2, dim=1)
        y1, y2 = reversible_sequence(list(self.couplings), h1, h2, backprop=backprop)
        return self.norm(torch.cat([y1, y2], dim=1))


class ReversibleFeaturePyramid(_PyramidBase):
    """The p2-p6 pyramid of :class:`SimpleFeaturePyramid`, keeping only its outputs for backward.

    It reads the trunk's two streams (``net.forward_streams``) and builds each level as::

        x1, x2   (C each, stride 16)    the trunk's last output: the trunk keeps it anyway
          |  fuse: concat + LayerNorm over 2C                  recomputed
          |  1x1 conv to s*s*D + depth-to-space (s = 4, 2, 1)  recomputed
          |    or space-to-depth + 1x1 conv to D (s = 0.5)
        h1, h2   (D/2 each, stride 16/s)
          |  num_blocks additive couplings:                   invertible: rebuilt
          |    y1 = h1 + F(h2), y2 = h2 + G(y1)                 by the reversible engine
          |    F, G = norm + GELU + 3x3 conv
          |  concat + norm                                     recomputed
        p_level  (D, stride 16/s)        stored: the output, which the heads keep anyway

        p6 = top_block(p5)               stored (tiny)

    What is stored between forward and backward is the outputs and nothing else. In
    "reversible" and "checkpoint" modes each level is one recomputed unit
    (``torch.utils.checkpoint``, non-reentrant), whose only input is the trunk's output
    streams, which the trunk keeps. Storing the couplings' output instead (to recompute only
    the head) would keep a second full-size map per level, twice the outputs. In backward the
    levels are re-run one at a time; inside the re-run the couplings go through the reversible
    engine, which rebuilds their inputs from their outputs, so the working set is that of one
    level with one coupling's activations, not of all couplings. The price is compute: a
    level's forward runs twice and its couplings three times per training step.

    ``backprop="autograd"`` runs the same architecture with every activation stored (the fair
    baseline); in eval mode or without grad the modules run plainly, with no checkpoint and no
    custom autograd Function.

    Args:
        net: the trunk: a Backbone with ``forward_streams(x) -> (x1, x2)``, each (B, C, H/16,
            W/16); ``fuse(x1, x2) -> (B, 2C, H/16, W/16)``; a 2C-channel ``output_shape()``;
            and ``backprop``.
        out_channels: channels D of every output level (even: two coupling streams).
        scale_factors: resampling of the trunk output per level, among 4, 2, 1 and 0.5.
        num_blocks: coupling blocks per level.
        top_block: extra coarser levels computed from one level (``LastLevelMaxPool``: p6
            from p5), or None for none. It holds no state, so the default instance is shared.
        norm: "LN", a Detectron2 norm name, a callable taking the channel count, or "".
        square_pad: pad inputs to a square of this size (0: to ``size_divisibility`` only).
        backprop: "reversible", "autograd" or "checkpoint"; None follows ``net.backprop``.
    """

    def __init__(
        self,
        net: Backbone,
        out_channels: int = 256,
        scale_factors: Sequence[float] = SCALE_FACTORS,
        num_blocks: int = 2,
        top_block: Optional[nn.Module] = LastLevelMaxPool(),
        norm: Norm = "LN",
        square_pad: int = 0,
        backprop: Optional[str] = None,
    ):
        super().__init__()
        if not (hasattr(net, "forward_streams") and hasattr(net, "fuse")):
            raise TypeError(
                f"{type(net).__name__} lacks forward_streams() or fuse(); the reversible pyramid "
                "needs a two-stream trunk such as RevViT."
            )
        if out_channels % 2:
            raise ValueError(f"out_channels {out_channels} must be even (two coupling streams).")
        self.net = net
        in_shape = net.output_shape()[net._out_features[0]]
        self._init_outputs(in_shape.stride, scale_factors, out_channels, top_block, square_pad)
        self.levels = nn.ModuleList(
            _Level(scale, in_shape.channels, out_channels, num_blocks, norm)
            for scale in scale_factors
        )
        self._backprop = None
        if backprop is not None:
            self.backprop = backprop

    @property
    def backprop(self) -> str:
        return self._backprop or self.net.backprop

    @backprop.setter
    def backprop(self, mode: str):
        self._backprop = check_choice("backprop", mode, BACKPROP_MODES)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x1, x2 = self.net.forward_streams(x)
        mode = self.backprop
        recompute = mode != "autograd" and self.training and torch.is_grad_enabled()
        levels = []
        for level in self.levels:
            if recompute:
                out = checkpoint(level, x1, x2, self.net.fuse, mode, use_reentrant=False)
            else:
                out = level(x1, x2, self.net.fuse, mode)
            levels.append(out)
        return self._add_top_block(levels)
