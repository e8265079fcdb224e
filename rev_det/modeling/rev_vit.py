"""RevViT: the ViTDet plain backbone made reversible (Mangalam et al., CVPR 2022)."""

import logging
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from torch import nn
from torchvision.ops import StochasticDepth

from ..reversible import ReversibleBlock, ReversibleSequence, run_recomputed
from .attention import (
    Mlp,
    attention_with_rel_pos,
    check_image,
    init_vit_weights,
    resize_abs_pos,
    tokens_from_map,
    window_partition,
    window_unpartition,
)
from .layers import get_norm
from .trunk import TwoStreamTrunk
from .trunk_args import backprop_args, size_args

__all__ = [
    "RevViT",
    "RevViTBlock",
    "Attention",
    "PatchEmbed",
    "ViTTokens",
    "REVVIT_SIZES",
    "abs_pos_embed",
    "check_vit_args",
    "vit_blocks",
    "vit_trunk_args",
]

logger = logging.getLogger(__name__)

# ViTDet's B/L/H: width, depth, heads, drop path and the blocks that use window attention
# (the others, evenly spaced, use global attention). The one table of these numbers: yacs configs
# name a row (MODEL.REVVIT.SIZE), LazyConfigs unpack one (``L(RevViT)(**REVVIT_SIZES["B"], ...)``).
REVVIT_SIZES = {
    "B": dict(
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_block_indexes=(0, 1, 3, 4, 6, 7, 9, 10),
    ),
    "L": dict(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        drop_path_rate=0.4,
        window_block_indexes=tuple(i for i in range(24) if i % 6 != 5),
    ),
    "H": dict(
        embed_dim=1280,
        depth=32,
        num_heads=16,
        drop_path_rate=0.5,
        window_block_indexes=tuple(i for i in range(32) if i % 8 != 7),
    ),
}


def vit_trunk_args(cfg) -> Dict[str, Any]:
    """The arguments ``cfg.MODEL.REVVIT`` gives a ViT-shaped trunk: the part of
    :meth:`RevViT.from_config` that Detectron2's own ``ViT`` shares by name (the benchmarks build
    ViTDet from it; RevViT's stem and backprop options are not in it).

    Args:
        cfg: a Detectron2 config with rev_det's keys.

    Returns:
        dict: keyword arguments, sized by ``MODEL.REVVIT.SIZE`` and the size keys the config sets.
    """
    c = cfg.MODEL.REVVIT
    return dict(
        img_size=c.IMG_SIZE,
        patch_size=c.PATCH_SIZE,
        mlp_ratio=c.MLP_RATIO,
        qkv_bias=c.QKV_BIAS,
        use_abs_pos=c.USE_ABS_POS,
        use_rel_pos=c.USE_REL_POS,
        window_size=c.WINDOW_SIZE,
        pretrain_img_size=c.PRETRAIN_IMG_SIZE,
        pretrain_use_cls_token=c.PRETRAIN_USE_CLS_TOKEN,
        **size_args(c, "MODEL.REVVIT", REVVIT_SIZES),
    )


class PatchEmbed(nn.Module):
    """Image to patch tokens: (B, C, H, W) -> dense (B, H / p, W / p, D).

    By default one p x p convolution of stride p (``proj``), as in ViT and ViTDet. With
    ``stem_channels`` a convolutional stem comes first ("Early convolutions help transformers
    see better", Xiao et al., NeurIPS 2021): one 3x3 convolution of stride 2 + norm + ReLU per
    entry, then ``proj`` with the stride left over (1x1 when the stem reaches stride p). A
    ViT trained from scratch on little data learns much faster with it. When its trunk
    recomputes (a mode other than autograd) the stem is recomputed in backward too, unless a
    batch norm of it trains ("FrozenBN", the default, and "GN" do not).

    Args:
        patch_size: the stride p of the tokens.
        in_chans: image channels.
        embed_dim: token channels D.
        stem_channels: output channels of each stride-2 stem convolution; () for none.
        stem_norm: normalisation after each stem convolution (see :func:`get_norm`).
    """

    def __init__(
        self,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        stem_channels: Sequence[int] = (),
        stem_norm: str = "FrozenBN",
    ):
        super().__init__()
        stride = 2 ** len(stem_channels)
        if patch_size % stride:
            raise ValueError(
                f"a stem of {len(stem_channels)} stride-2 convolutions (stride {stride}) does "
                f"not divide the patch size {patch_size}; use at most "
                f"{(patch_size & -patch_size).bit_length() - 1} stem convolutions."
            )
        layers = []
        for c_in, c_out in zip((in_chans, *stem_channels), stem_channels):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=not stem_norm),
                get_norm(stem_norm, c_out),
                nn.ReLU(inplace=True),
            ]
        # An empty Sequential has no parameters: checkpoints of the plain embedding still match.
        self.stem = nn.Sequential(*[m for m in layers if m is not None])
        c_in = stem_channels[-1] if stem_channels else in_chans
        k = patch_size // stride
        self.proj = nn.Conv2d(c_in, embed_dim, kernel_size=k, stride=k)

    def recomputable(self) -> bool:
        """Whether recomputing it in backward is worth it and exact: it has a stem (a plain
        embedding keeps nothing but its input) and no batch norm of the stem is training."""
        training_bn = any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.stem
        )
        return len(self.stem) > 0 and not training_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tokens_from_map(self.proj(self.stem(x)))


class Attention(nn.Module):
    """Multi-head self-attention on a (B, H, W, C) grid with optional relative position bias.

    Args:
        dim: number of channels.
        num_heads: number of heads.
        qkv_bias: add a bias to the query, key and value projections.
        use_rel_pos: add the decomposed relative position bias.
        input_size: the (H, W) grid the relative position tables are sized for; other sizes
            interpolate them.
        fold_rel_pos: fold the bias into q/k (see :func:`attention_with_rel_pos`); for global
            attention, where an explicit N x N bias would dominate memory.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: Optional[Tuple[int, int]] = None,
        fold_rel_pos: bool = False,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.fold_rel_pos = fold_rel_pos
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            head_dim = dim // num_heads
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): attention over the whole grid or, with ``window_size``,
        within each of ViTDet's windows (:func:`window_partition`).

        ViTDet pads the grid with zero tokens to whole windows before its attention module, so
        that the padding takes part as keys and values (their q, k, v: the qkv bias) and both
        projections run on it. Here they run on the grid's tokens only: the bias is added after
        the zero padding, and the output projection after the windows are merged and cropped.
        The same result, at the projections' cost of the unpadded grid (ViT-B at 512x512: 1024
        tokens per window block instead of 1764; at 1024x1024, 4096 instead of 4900).
        """
        if not window_size:
            return self.proj(self._attend(self.qkv(x)))
        hw = x.shape[1:3]
        windows, padded_hw = window_partition(nn.functional.linear(x, self.qkv.weight), window_size)
        if self.qkv.bias is not None:
            # In the linear layer's dtype (under autocast a bf16 output plus a float32 bias
            # would promote q, k and v to float32, as nn.Linear does not).
            windows = windows + self.qkv.bias.to(windows.dtype)
        return self.proj(window_unpartition(self._attend(windows), window_size, padded_hw, hw))

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of a (B, H, W, 3C) grid of queries, keys and values, before the
        output projection: (B, H, W, C)."""
        b, h, w, c3 = qkv.shape
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
        x = attention_with_rel_pos(q, k, v, (h, w), (h, w), *rel, fold=self.fold_rel_pos)
        return x.transpose(1, 2).reshape(b, h, w, c3 // 3)


class RevViTBlock(ReversibleBlock):
    """A ViT block as a reversible block: F = norm1 + attention, G = norm2 + MLP.

    There is no residual skip inside F or G: the coupling ``Y1 = X1 + F(X2)``,
    ``Y2 = X2 + G(Y1)`` is the residual (keeping ViT's inner skips trains badly past ~8 blocks,
    as the paper shows). Drop path is applied to F's and G's outputs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer=nn.LayerNorm,
        act_layer=nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        self.window_size = window_size
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            fold_rel_pos=window_size == 0,
        )
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act_layer)

    def F(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.drop_path(self.attn(self.norm1(x), self.window_size))

    def G(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.drop_path(self.mlp(self.norm2(x)))


def check_vit_args(
    depth: int,
    num_heads: int,
    embed_dim: int,
    window_size: int,
    window_block_indexes: Sequence[int],
) -> None:
    """Raise a ValueError naming the argument for a ViT shape that cannot be built."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1 (the number of blocks), got {depth}.")
    bad = [i for i in window_block_indexes if not 0 <= i < depth]
    if bad:
        raise ValueError(
            f"window_block_indexes {bad} are outside the {depth} blocks (0..{depth - 1}); "
            "list only indexes below depth, or raise depth."
        )
    if window_block_indexes and window_size <= 0:
        raise ValueError("window_block_indexes is set but window_size is not positive.")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}.")


def abs_pos_embed(
    use_abs_pos: bool, pretrain_img_size: int, patch_size: int, use_cls_token: bool, dim: int
) -> Optional[nn.Parameter]:
    """ViT's absolute position embeddings of its pre-training grid, (1, L, dim) zeros with
    L = (pretrain_img_size / patch_size)^2 (+ 1 with a class token); None without them."""
    if not use_abs_pos:
        return None
    num_positions = (pretrain_img_size // patch_size) ** 2 + int(use_cls_token)
    return nn.Parameter(torch.zeros(1, num_positions, dim))


class ViTTokens:
    """The patch tokens of a ViT-layout trunk (RevViT, RevViTDet): ``patch_embed`` (with its
    optional convolutional stem) and the absolute position embeddings ``pos_embed`` of a
    pre-training grid, named as in ViT so that checkpoints load by name. A mixin of the trunk's
    ``nn.Module``."""

    def _init_tokens(
        self,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        stem_channels: Sequence[int],
        stem_norm: str,
        use_abs_pos: bool,
        pretrain_img_size: int,
        pretrain_use_cls_token: bool,
    ):
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, stem_channels, stem_norm)
        self.pos_embed = abs_pos_embed(
            use_abs_pos, pretrain_img_size, patch_size, pretrain_use_cls_token, embed_dim
        )

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> dense tokens (B, H / p, W / p, D) with their positions."""
        check_image(x, self.in_chans, self.patch_size, type(self).__name__, "the patch size ")
        # A convolutional stem's maps are recomputed in backward with the trunk, unless a batch
        # norm in it trains (recomputing would update its statistics twice).
        recompute = self.recomputes() and self.patch_embed.recomputable()
        x = run_recomputed(recompute, self.patch_embed, x)
        if self.pos_embed is not None:
            x = x + resize_abs_pos(self.pos_embed, self.pretrain_use_cls_token, x.shape[1:3])
        return x


def vit_blocks(
    block: type,
    grid: int,
    depth: int,
    drop_path_rate: float,
    window_size: int,
    window_block_indexes: Sequence[int],
    **kwargs,
) -> List[nn.Module]:
    """``depth`` ViT blocks as ViTDet lays them out: drop path rising linearly from 0 to
    ``drop_path_rate``, window attention in ``window_block_indexes`` and global attention on the
    ``grid`` x ``grid`` tokens elsewhere.

    Args:
        block: the block class (:class:`RevViTBlock` or a subclass); ``kwargs`` go to it.
        grid: the token grid's side (image size / patch size), the size of the global blocks'
            relative position tables.
    """
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return [
        block(
            drop_path=rates[i],
            window_size=window_size if i in window_block_indexes else 0,
            input_size=(grid, grid),
            **kwargs,
        )
        for i in range(depth)
    ]


class RevViT(TwoStreamTrunk, ViTTokens):
    """Reversible Vision Transformer trunk for detection (ViTDet layout, Rev-ViT blocks).

    The patch tokens are duplicated into two streams (as in the paper), run through
    ``depth`` reversible blocks (:class:`RevViTBlock`, window attention in
    ``window_block_indexes`` and global attention elsewhere), and fused at the end.

    Fusion: the two output streams are concatenated (2C channels) and normalised by one
    LayerNorm over the 2C channels (``norm``). This is the paper's Rev-ViT fusion: X1 carries
    the attention updates and X2 the MLP updates, both are needed to describe the output
    (neither alone is the block output of a plain ViT), and concatenation keeps all of it with
    a single extra LayerNorm as the only parameters beyond ViT's. ``last_feat`` therefore has
    2C channels at stride 16.

    For the reversible pyramid, :meth:`forward_streams` returns the two streams unfused.

    Args:
        img_size: input size the relative position tables of global blocks are sized for.
        patch_size: patch size (stride of the output).
        in_chans: number of input image channels.
        embed_dim: width C of each stream.
        depth: number of reversible blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width over embed_dim.
        qkv_bias: bias in the query, key and value projections.
        drop_path_rate: stochastic depth rate of the last block (linear from 0).
        norm_layer: normalisation of the blocks and the fusion.
        act_layer: MLP activation.
        use_abs_pos: add absolute position embeddings (from a pre-training grid, resized).
        use_rel_pos: add decomposed relative position bias in attention.
        window_size: window size of window-attention blocks.
        window_block_indexes: indexes of blocks using window attention.
        pretrain_img_size: image size of the pre-training grid of ``pos_embed``.
        pretrain_use_cls_token: whether ``pos_embed`` has a class-token entry (dropped).
        stem_channels: channels of a convolutional stem before the patch projection (see
            :class:`PatchEmbed`); () for ViT's patch embedding.
        stem_norm: normalisation of the stem's convolutions.
        backprop: "reversible", "autograd" or "checkpoint" (see :mod:`rev_det.reversible`).
        parallel_backward: on CUDA, overlap rebuilding and back-propagation of the blocks on
            two CUDA streams (see :func:`rev_det.reversible.reversible_sequence`).
        out_feature: name of the output feature.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (),
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        stem_channels: Sequence[int] = (),
        stem_norm: str = "FrozenBN",
        backprop: str = "reversible",
        parallel_backward: bool = False,
        out_feature: str = "last_feat",
    ):
        super().__init__()
        check_vit_args(depth, num_heads, embed_dim, window_size, window_block_indexes)
        self._init_tokens(
            patch_size,
            in_chans,
            embed_dim,
            stem_channels,
            stem_norm,
            use_abs_pos,
            pretrain_img_size,
            pretrain_use_cls_token,
        )
        blocks = vit_blocks(
            RevViTBlock,
            img_size // patch_size,
            depth,
            drop_path_rate,
            window_size,
            window_block_indexes,
            dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            norm_layer=norm_layer,
            act_layer=act_layer,
            use_rel_pos=use_rel_pos,
        )
        self.blocks = ReversibleSequence(blocks, backprop, parallel_backward)
        self.norm = norm_layer(2 * embed_dim)

        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: 2 * embed_dim}
        self._out_feature_strides = {out_feature: patch_size}
        init_vit_weights(self, self.pos_embed)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> Dict[str, Any]:
        """The constructor arguments from ``cfg.MODEL.REVVIT`` and ``cfg.MODEL.REV``
        (Detectron2's ``from_config``): the one place that reads this trunk's config keys.

        The size is the row of :data:`REVVIT_SIZES` that ``MODEL.REVVIT.SIZE`` names, and any of
        its keys the config sets wins over it (see :func:`~rev_det.modeling.trunk_args.size_args`).

        Args:
            cfg: a Detectron2 config with rev_det's keys.
            input_shape: the images' shape; its ``channels`` is ``in_chans``.

        Returns:
            dict: keyword arguments of :class:`RevViT`.
        """
        c = cfg.MODEL.REVVIT
        return dict(
            in_chans=input_shape.channels,
            **vit_trunk_args(cfg),
            stem_channels=tuple(c.STEM_CHANNELS),
            stem_norm=c.STEM_NORM,
            **backprop_args(cfg),
        )

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def forward_streams(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two streams after the last block, each (B, C, H / p, W / p)."""
        x = self.tokens(x)
        x1, x2 = self.blocks(x, x)
        return x1.permute(0, 3, 1, 2), x2.permute(0, 3, 1, 2)

    def fuse(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Concatenate the (B, C, h, w) streams and LayerNorm the 2C channels."""
        x = torch.cat([x1, x2], dim=1).permute(0, 2, 3, 1)
        # Contiguous (N, C, H, W) for the pyramid's convolutions (see LayerNorm2d).
        return self.norm(x).permute(0, 3, 1, 2).contiguous()

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }
