"""Pyramid adapters from a single-scale reversible trunk to the p2-p6 pyramid of Mask R-CNN.

* :class:`SimpleFeaturePyramid`: ViTDet's adapter (the baseline of every comparison).
* :class:`ReversibleFeaturePyramid`: the same outputs, with internal activations rebuilt or
  recomputed in backward instead of stored.
"""

import logging
import math
from functools import lru_cache, partial
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d
from detectron2.modeling import Backbone
from torch import nn

from ..reversible import (
    BackpropModule,
    ReversibleBlock,
    SequenceOutput,
    TrunkModeModule,
    recomputed_branches,
    reversible_sequence,
    run_recomputed,
)
from .layers import LayerNorm2d, get_norm
from .trunk import TwoStreamTrunk

__all__ = ["SimpleFeaturePyramid", "ReversibleFeaturePyramid"]

logger = logging.getLogger(__name__)

# Resampling of the trunk's map per level: up to 4x finer (ViTDet's p2 from stride 16) and
# down to 4x coarser (p5 from a stride-8 trunk, patch size 8).
_SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5, 0.25)


def _check_scale(scale: float) -> float:
    if scale not in _SCALE_FACTORS:
        raise ValueError(
            f"scale factor {scale} is not one of {_SCALE_FACTORS} (trunk stride / level stride); "
            "use a trunk of stride 8 or 16 (patch size 8 or 16) for a p2-p5 pyramid."
        )
    return scale


class _PyramidBase(Backbone):
    """Names, strides and padding of a p2-p6 pyramid on a single-scale trunk."""

    def _init_outputs(self, net, scale_factors, out_channels, top_block, square_pad):
        """Set the output names, strides and channels; return the scale factors (by default
        those that give p2-p5, strides 4-32, from the trunk's stride)."""
        in_stride = net.output_shape()[net._out_features[0]].stride
        if scale_factors is None:
            scale_factors = tuple(in_stride / s for s in (4, 8, 16, 32))
        strides = [int(in_stride / s) for s in scale_factors]
        self._out_features = [f"p{int(math.log2(s))}" for s in strides]
        self._out_feature_strides = dict(zip(self._out_features, strides))
        self.top_block = top_block
        if top_block is not None:
            last = int(math.log2(strides[-1]))
            for i in range(top_block.num_levels):
                name = f"p{last + i + 1}"
                self._out_features.append(name)
                self._out_feature_strides[name] = 2 ** (last + i + 1)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = max(self._out_feature_strides.values())
        self._square_pad = square_pad
        return scale_factors

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        # Detectron2 main reads "size_divisibility" here (its own SimpleFeaturePyramid misspells
        # the key, so only square padding enforces divisibility there). "square_size" is left
        # out on purpose: main's ImageList.from_tensors would pad to it before the backbone runs
        # and silently crop larger images (their image_sizes unchanged), so the square padding
        # and its size check stay in _pad_to_square, the same code on v0.6 (which has no
        # padding_constraints) and on main.
        return {"size_divisibility": self._size_divisibility}

    def _pad_to_square(self, x: torch.Tensor) -> torch.Tensor:
        # Detectron2 pads batches to size_divisibility only (see padding_constraints); the
        # square padding is done here, after checking that the batch fits.
        if not self._square_pad:
            return x
        side = -(-self._square_pad // self._size_divisibility) * self._size_divisibility
        h, w = x.shape[-2:]
        if h > side or w > side:
            raise ValueError(
                f"a batch padded to {h}x{w} does not fit square_pad {self._square_pad}; resize "
                f"images to at most {self._square_pad} pixels a side (INPUT.MAX_SIZE_TRAIN/TEST) "
                "or set square_pad to 0 (MODEL.REV.SQUARE_PAD)."
            )
        return F.pad(x, (0, side - w, 0, side - h))  # zeros, as ImageList pads

    def _with_top_block(self, results):
        if self.top_block is not None:
            results.extend(self.top_block(results[-1]))
        return dict(zip(self._out_features, results))


def _resampling(scale: float, dim: int, out_channels: int, norm) -> List[nn.Module]:
    """ViTDet's resampling of a ``dim``-channel map by ``scale``, then a 1x1 conv to
    ``out_channels`` + norm: the part of a pyramid level that both adapters share.

    4 -> ConvTranspose(dim, dim/2) + norm + GELU + ConvTranspose(dim/2, dim/4);
    2 -> ConvTranspose(dim, dim/2); 1 -> nothing; 0.5 -> MaxPool 2; 0.25 -> MaxPool 4.
    """
    _check_scale(scale)
    if scale == 4.0:
        layers = [
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            get_norm(norm, dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2),
        ]
        width = dim // 4
    elif scale == 2.0:
        layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
    elif scale == 1.0:
        layers, width = [], dim
    else:
        factor = int(1 / scale)
        layers, width = [nn.MaxPool2d(factor, stride=factor)], dim
    layers.append(Conv2d(width, out_channels, 1, bias=not norm, norm=get_norm(norm, out_channels)))
    return layers


def _reduce(dim: int, width: int, norm) -> nn.Module:
    """The 1x1 conv + norm that takes a two-stream trunk's fused map to ``width`` channels."""
    return Conv2d(dim, width, 1, bias=not norm, norm=get_norm(norm, width))


class SimpleFeaturePyramid(_PyramidBase):
    """ViTDet's simple feature pyramid: deconvolutions / pooling from one single-scale map.

    Per scale factor: 4 -> ConvTranspose(C, C/2) + norm + GELU + ConvTranspose(C/2, C/4);
    2 -> ConvTranspose(C, C/2); 1 -> nothing; 0.5 -> MaxPool 2; 0.25 -> MaxPool 4 (for a
    stride-8 trunk); then 1x1 conv to
    ``out_channels`` + norm and 3x3 conv + norm. Sub-modules are named ``simfp_{level}`` as in
    ViTDet, so its checkpoints load by name.

    On a two-stream trunk the map is the fused streams, twice the trunk's width: ``width`` (the
    stream width) makes the pyramid cost what ViTDet's costs on a ViT of that width. A shared
    1x1 conv + norm (``reduce``) takes the map to ``width`` channels first, and C above is
    ``width``.

    Args:
        net: the trunk (a Backbone with a single-scale output ``in_feature``).
        in_feature: name of the trunk output to use.
        width: channels the resampling starts from; None: the trunk output's (ViTDet).
        out_channels: channels of every output level.
        scale_factors: resampling of the trunk output per level (trunk stride / level stride);
            None: p2-p5, i.e. ViTDet's (4, 2, 1, 0.5) on a stride-16 trunk, (2, 1, 0.5, 0.25) on
            a stride-8 one.
        top_block: extra coarser levels from the last one (e.g. LastLevelMaxPool for p6).
        norm: "LN", a Detectron2 norm name, or a callable taking the channel count.
        square_pad: pad inputs to a square of this size, rounded up to size_divisibility (0: pad
            to size_divisibility only). Inputs larger than it are an error.
        recompute: when the trunk recomputes (a :class:`~rev_det.reversible.BackpropModule`
            whose mode is not "autograd", in training), run each level as one recomputed unit:
            only the trunk's map, which the trunk keeps anyway, and the levels' outputs, which
            the heads keep, stay alive between forward and backward. The same function and
            parameters. Off by default (ViTDet's pyramid stores its activations); RevViTDet's
            configs turn it on.
    """

    def __init__(
        self,
        net: Backbone,
        in_feature: str = "last_feat",
        width: Optional[int] = None,
        out_channels: int = 256,
        scale_factors: Optional[Sequence[float]] = None,
        top_block: Optional[nn.Module] = None,
        norm="LN",
        square_pad: int = 0,
        recompute: bool = False,
    ):
        super().__init__()
        self.net = net
        self.in_feature = in_feature
        self.recompute = recompute
        scale_factors = self._init_outputs(net, scale_factors, out_channels, top_block, square_pad)
        dim = net.output_shape()[in_feature].channels
        self.reduce = None
        if width is not None and width != dim:
            self.reduce = _reduce(dim, width, norm)
            dim = width
        self.stages = []
        for scale, name in zip(scale_factors, self._out_features):
            layers = _resampling(scale, dim, out_channels, norm)
            layers.append(
                Conv2d(
                    out_channels,
                    out_channels,
                    3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, out_channels),
                )
            )
            stage = nn.Sequential(*layers)
            self.add_module(f"simfp_{name[1:]}", stage)
            self.stages.append(stage)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.net(self._pad_to_square(x))[self.in_feature]
        if self.reduce is not None:
            features = self.reduce(features)
        recompute = (
            self.recompute and isinstance(self.net, BackpropModule) and self.net.recomputes()
        )
        return self._with_top_block(
            [run_recomputed(recompute, stage, features) for stage in self.stages]
        )


class _Coupling(ReversibleBlock):
    """An additive coupling on two half-width maps: F and G are norm + 3x3 conv + GELU."""

    def __init__(self, channels: int, norm):
        super().__init__()
        self.f_norm, self.f_conv = get_norm(norm, channels), nn.Conv2d(channels, channels, 3, 1, 1)
        self.g_norm, self.g_conv = get_norm(norm, channels), nn.Conv2d(channels, channels, 3, 1, 1)

    def F(self, x):  # noqa: N802
        return F.gelu(self.f_conv(self.f_norm(x)))

    def G(self, x):  # noqa: N802
        return F.gelu(self.g_conv(self.g_norm(x)))


class _NormedStreams(SequenceOutput):
    """A pyramid level's output: its two coupling streams concatenated and normalised,
    (N, C, H, W)-contiguous for the heads.

    With rev_det's LayerNorm2d (norm "LN") it is inverted from each pixel's mean and standard
    deviation over the channels (two numbers per pixel, 1/128 of the streams at 256 channels),
    those the forward normalised with (:meth:`LayerNorm2d.inverse`). A level whose norm cannot
    be inverted (``invertible`` False, see :func:`_invertible`) keeps its streams instead, as a
    reversible sequence without an output does.
    """

    def __init__(self, norm: nn.Module, invertible: bool):
        self.norm, self.invertible = norm, invertible

    def __call__(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.cat([y1, y2], dim=1)).contiguous()

    def parameters(self) -> List[nn.Parameter]:
        return list(self.norm.parameters())

    def forward_kept(self, y1, y2):
        if not self.invertible:
            return self(y1, y2), None
        out, mean, rstd = self.norm.forward_with_statistics(torch.cat([y1, y2], dim=1))
        return out.contiguous(), (mean, rstd)

    def inverse(self, out, kept):
        # Dense channels-last halves, as the coupling blocks ran in forward (_Level.couple; see
        # SequenceOutput.inverse).
        return self.norm.inverse(out, *kept, chunks=2, memory_format=torch.channels_last)


# |weight| of an LN below which its inverse is not trusted: it multiplies the rounding error of
# the output by up to std / |weight| (fp32: 6e-8 relative to |out - bias|).
MIN_INVERTIBLE_WEIGHT = 1e-3


def _invertible(norms: Sequence[nn.Module]) -> List[bool]:
    """Per level output norm, whether :class:`_NormedStreams` inverts it: a LayerNorm2d with
    every |weight| >= :data:`MIN_INVERTIBLE_WEIGHT`. A level that cannot invert its norm is
    logged once."""
    inverts = [isinstance(n, LayerNorm2d) for n in norms]
    weights = [n.weight.detach().abs().min() for n, ok in zip(norms, inverts) if ok]
    # One device-to-host copy for all levels.
    smallest = iter(torch.stack(weights).tolist() if weights else [])
    flags = [ok and next(smallest) >= MIN_INVERTIBLE_WEIGHT for ok in inverts]
    for norm, flag in zip(norms, flags):
        if not flag:
            _log_streams_kept(type(norm).__name__)
    return flags


@lru_cache(maxsize=None)
def _log_streams_kept(norm: str):
    logger.warning(
        "A reversible pyramid level's output norm (%s) cannot be inverted (a norm other than "
        "LN, or an LN weight below %g in magnitude): the level keeps its coupling streams for "
        "backward (the memory of one more output per level). Same gradients.",
        norm,
        MIN_INVERTIBLE_WEIGHT,
    )


class _Level(nn.Module):
    """One pyramid level from the trunk's streams (see ReversibleFeaturePyramid)."""

    def __init__(self, scale: float, dim: int, out_channels: int, num_blocks: int, norm):
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"out_channels {out_channels} must be even (two coupling streams).")
        self.resample = nn.Sequential(*_resampling(scale, dim, out_channels, norm))
        # Not "blocks": layer-wise lr decay reads "blocks.{i}" as trunk depth.
        self.couplings = nn.ModuleList(
            _Coupling(out_channels // 2, norm) for _ in range(num_blocks)
        )
        self.norm = get_norm(norm, out_channels)

    def forward(self, x: torch.Tensor, mode: str, recompute: bool) -> torch.Tensor:
        """The level's map from the trunk's reduced map ``x`` (the pyramid's, shared by its
        levels).

        Args:
            mode: the coupling blocks' backprop mode.
            recompute: run the resampling as its own recomputed unit.
        """
        return self.couple(run_recomputed(recompute, self.resampled, x), mode)

    def resampled(self, x: torch.Tensor) -> torch.Tensor:
        """``self.resample(x)``, channels-last from its 1x1 projection on.

        ViTDet's deconvolutions run channels-first (they are slower on CPU fed channels-last);
        the projection, its norm and the coupling blocks (:meth:`couple`) run channels-last:
        the blocks' 3x3 convolutions take most of the pyramid's time, and on CPU they run faster
        so (the norms keep the layout, see LayerNorm2d).
        Converting the map before the projection, where it is narrowest at p2 (W/4 channels),
        spares the D-channel map three layout copies (the norm's input and output and the
        couplings' input) in forward and again in the recomputation.
        """
        *resample, project = self.resample
        for layer in resample:
            x = layer(x)
        return project(x.contiguous(memory_format=torch.channels_last))

    def couple(self, h: torch.Tensor, mode: str, invertible: bool = False) -> torch.Tensor:
        """The coupling blocks and the output norm on the resampled map ``h``
        (:meth:`resampled`'s, channels-last); the output is contiguous (N, C, H, W) for the
        heads.

        Args:
            mode: the coupling blocks' backprop mode.
            invertible: in "reversible" mode, keep the output and the norm's statistics
                instead of the streams (see :class:`_NormedStreams`).
        """
        output = _NormedStreams(self.norm, invertible)
        return reversible_sequence(
            list(self.couplings), *h.chunk(2, dim=1), backprop=mode, output=output
        )


class ReversibleFeaturePyramid(_PyramidBase, TrunkModeModule):
    """A p2-p6 pyramid whose internal activations are rebuilt or recomputed in backward.

    ViTDet's simple pyramid with its 3x3 conv replaced by additive coupling blocks, on the
    trunk's two streams (``net.forward_streams``). Per level::

        x1, x2 (C each, trunk stride t)   kept anyway: the trunk's reversible output
          | the trunk's fusion (RevViT: concat + LayerNorm; RevViTDet: its
          |   last stream), 1x1 conv to W + norm                           (recomputed)
          | ViTDet's resampling (deconvolutions / max pooling),             (recomputed)
          |   1x1 conv to D + norm
        h (D channels, stride t / s)
          | two halves -> N additive coupling blocks                        (invertible: rebuilt)
          |   y1 = h1 + F(h2), y2 = h2 + G(y1);  F, G = norm + 3x3 conv + GELU
          | concat, LayerNorm                          (inverted: per-pixel mean and std kept)
        p_level (D channels)              kept: the heads need it

    In "reversible" mode nothing of a level is run again to get back to its coupling blocks'
    outputs: the output norm is inverted from ``p_level`` and each pixel's mean and standard
    deviation over the channels (:class:`_NormedStreams`), and the reversible engine rebuilds
    the blocks' input h from there. The fusion + reduction and the levels' resamplings are one
    recomputed unit (:func:`~rev_det.reversible.recomputed_branches`), whose inputs are the
    trunk's output, which the trunk keeps anyway: in backward the reduced map is computed once
    for all levels, and each level's resampling is re-run and back-propagated right after its
    coupling blocks, so that one level's working set is alive at a time. Between forward and
    backward the pyramid keeps its outputs and two numbers per output pixel. In "checkpoint"
    mode the reduction and each level are ``torch.utils.checkpoint`` units (the reduced map is
    kept: it is the levels' input). In "autograd" mode the same architecture stores every
    activation (the fair baseline). p6 is ``top_block`` on p5.

    Args:
        net: the trunk, a :class:`TwoStreamTrunk` (``forward_streams``, ``fuse``,
            ``backprop``).
        width: channels the resampling starts from (W); None: the stream width C, which makes
            the resampling cost what ViTDet's costs on a ViT of that width.
        out_channels: channels of every output level (D, even).
        scale_factors: resampling per level (trunk stride / level stride); None: p2-p5, i.e.
            (4, 2, 1, 0.5) on a stride-16 trunk, (2, 1, 0.5, 0.25) on a stride-8 one.
        num_blocks: coupling blocks per level. One (F and G: 3x3 convs on the D/2-channel
            halves) has half the parameters and FLOPs of ViTDet's 3x3 conv, so that with the
            recomputation of its backward the pyramid costs about what ViTDet's costs; on the
            demo it is as accurate as ViTDet's pyramid (two were no better with an earlier
            resampling; ``docs/demo.md``).
        top_block: extra coarser levels from the last one (e.g. LastLevelMaxPool for p6).
        norm: "LN", a Detectron2 norm name, or a callable taking the channel count.
        square_pad: pad inputs to a square of this size, rounded up to size_divisibility (0: pad
            to size_divisibility only). Inputs larger than it are an error.
        backprop: "reversible", "autograd" or "checkpoint"; None follows ``net.backprop``.
    """

    def __init__(
        self,
        net: Backbone,
        width: Optional[int] = None,
        out_channels: int = 256,
        scale_factors: Optional[Sequence[float]] = None,
        num_blocks: int = 1,
        top_block: Optional[nn.Module] = None,
        norm="LN",
        square_pad: int = 0,
        backprop: Optional[str] = None,
    ):
        super().__init__()
        if not isinstance(net, TwoStreamTrunk):
            raise TypeError(
                f"{type(net).__name__} is not a TwoStreamTrunk; the reversible pyramid needs a "
                "two-stream trunk (forward_streams and fuse) such as RevViT."
            )
        self.net = net
        scale_factors = self._init_outputs(net, scale_factors, out_channels, top_block, square_pad)
        width = width or net.stream_channels
        fused = net.output_shape()[net._out_features[0]].channels
        self.reduce = _reduce(fused, width, norm)
        self.levels = nn.ModuleList(
            _Level(s, width, out_channels, num_blocks, norm) for s in scale_factors
        )
        self.backprop = backprop  # None follows the trunk's mode

    def _reduced(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.net.fuse(x1, x2))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x1, x2 = self.net.forward_streams(self._pad_to_square(x))
        mode = self.backprop
        if not self.recomputes():
            reduced = self._reduced(x1, x2)
            results = [level(reduced, mode, False) for level in self.levels]
        elif mode == "checkpoint":
            # torch.utils.checkpoint per unit: the same autograd graph as above (hence the
            # same gradients, bit for bit), with the reduced map kept as the levels' input.
            reduced = run_recomputed(True, self._reduced, x1, x2)
            results = [run_recomputed(True, level, reduced, mode, True) for level in self.levels]
        else:
            invertible = _invertible([level.norm for level in self.levels])
            results = recomputed_branches(
                self._reduced,
                [level.resampled for level in self.levels],
                (x1, x2),
                self,
                finish=[
                    partial(level.couple, mode=mode, invertible=flag)
                    for level, flag in zip(self.levels, invertible)
                ],
            )
        return self._with_top_block(list(results))
