"""RevMViT: MViT made reversible (Rev-MViT, Mangalam et al., CVPR 2022), in two layouts.

* ``"mvitv2"``: Detectron2's MViTv2 detection backbone made reversible (relative positions,
  residual pooling, queries pooled in every block, hybrid window attention): for MViTv2's
  recipes and checkpoints.
* ``"paper"``: the paper's released Rev-MViT (PySlowFast ``REV_MVIT_B_16_CONV``): queries pooled
  in the stage transitions only, key/value strides halved at every transition and nowhere
  doubled, and transitions that fuse the streams with an MLP, pool their skip path with the
  attention's query pooling and drop the whole output path. With absolute positions and no
  relative positions or residual pooling (its config), ``--source pyslowfast-revmvit`` loads the
  official checkpoint into it as the same function.
"""

import logging
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from torch import nn
from torchvision.ops import StochasticDepth

from ..reversible import BackpropModule, ReversibleBlock, reversible_sequence, run_recomputed
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
from .trunk_args import backprop_args, size_args

__all__ = [
    "LAYOUTS",
    "RevMViT",
    "RevMViTBlock",
    "StageTransitionBlock",
    "PoolingAttention",
    "ConvPatchEmbed",
    "pool_tokens",
    "REVMVIT_SIZES",
    "REVMVIT_PAPER_OPTIONS",
]

logger = logging.getLogger(__name__)

# The block layouts (see the module docstring).
LAYOUTS = ("mvitv2", "paper")

# The named sizes: width and heads of the first stage (both double at every stage), depth, the
# last block of each of the four stages, drop path, layout. "T" to "L" are MViTv2's detection
# sizes (Detectron2's MViTv2 configs); "paper_b" is the paper's Rev-MViT-B (PySlowFast
# REV_MVIT_B_16_CONV: transitions at blocks 1, 3 and 14, drop path 0.1). The one table of these
# numbers: yacs configs name a row (MODEL.REVMVIT.SIZE), LazyConfigs unpack one
# (``L(RevMViT)(**REVMVIT_SIZES["T"], ...)``).
REVMVIT_SIZES = {
    "T": dict(
        embed_dim=96,
        depth=10,
        num_heads=1,
        last_block_indexes=(0, 2, 7, 9),
        drop_path_rate=0.2,
        layout="mvitv2",
    ),
    "S": dict(
        embed_dim=96,
        depth=16,
        num_heads=1,
        last_block_indexes=(0, 2, 13, 15),
        drop_path_rate=0.2,
        layout="mvitv2",
    ),
    "B": dict(
        embed_dim=96,
        depth=24,
        num_heads=1,
        last_block_indexes=(1, 4, 20, 23),
        drop_path_rate=0.4,
        layout="mvitv2",
    ),
    "L": dict(
        embed_dim=144,
        depth=48,
        num_heads=2,
        last_block_indexes=(1, 7, 43, 47),
        drop_path_rate=0.5,
        layout="mvitv2",
    ),
    "paper_b": dict(
        embed_dim=96,
        depth=16,
        num_heads=1,
        last_block_indexes=(0, 2, 13, 15),
        drop_path_rate=0.1,
        layout="paper",
    ),
}

# The rest of the released Rev-MViT's configuration (PySlowFast REV_MVIT_B_16_CONV) beside its
# size ("paper_b"): absolute positions only, no residual pooling, global attention. With them
# the paper layout computes the official function (configs/COCO/mask_rcnn_rev_mvit_b_paper.yaml
# sets the same keys).
REVMVIT_PAPER_OPTIONS = dict(
    use_abs_pos=True, use_rel_pos=False, residual_pooling=False, adaptive_window_size=0
)

# Every stage transition halves the resolution (pooling stride of its queries and its skip).
_Q_STRIDE = 2


class ConvPatchEmbed(nn.Module):
    """Image to tokens with an overlapping convolution: (B, C, H, W) -> (B, H / s, W / s, D)."""

    def __init__(
        self,
        kernel_size: Tuple[int, int] = (7, 7),
        stride: Tuple[int, int] = (4, 4),
        padding: Tuple[int, int] = (3, 3),
        in_chans: int = 3,
        embed_dim: int = 96,
    ):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tokens_from_map(self.proj(x))


def pool_tokens(x: torch.Tensor, pool: nn.Module, norm: Optional[nn.Module] = None) -> torch.Tensor:
    """Apply a (B, C, H, W) pooling module to a (B, H, W, C) tensor, then an optional norm."""
    x = tokens_from_map(pool(x.permute(0, 3, 1, 2)))
    return norm(x) if norm is not None else x


def _fold_pays(q_hw: Tuple[int, int], k_hw: Tuple[int, int]) -> bool:
    """Whether to fold the relative position bias into q and k for these grids.

    An explicit bias is an (Nq, Nk) tensor per window and head, with a gradient of the same
    size in backward, and it keeps SDPA off its mask-free fused kernels. Folding appends
    kh + kw columns to q, k and (padded) v instead. Fold when the explicit bias would be the
    larger of the two: MViT's pooled keys keep kh + kw small (28 to 32 at 1024x1024 input,
    against a head dim of 96), so every block of a full-size model folds, while tiny grids,
    where the bias is negligible, keep it explicit and skip the wider matmuls (measured:
    ``docs/models.md``, RevMViT).
    """
    nq, nk = q_hw[0] * q_hw[1], k_hw[0] * k_hw[1]
    return nq * nk > (nq + 2 * nk) * (k_hw[0] + k_hw[1])


class PoolingAttention(nn.Module):
    """MViTv2 pooling attention on a (B, H, W, C) grid.

    Queries, keys and values are pooled per head by depthwise convolutions (``pool_q``,
    ``pool_k``, ``pool_v``) and layer-normalised (``norm_q``, ``norm_k``, ``norm_v``; queries
    only with ``pool_queries``: the paper's Rev-MViT pools them in stage transitions only); the
    decomposed relative position bias spans the query and the (coarser) key grid; the pooled
    queries are added to the attention output (residual pooling). Attention runs through
    :func:`attention_with_rel_pos` (scaled dot-product attention), windowed or global.

    Args:
        dim: input channels.
        dim_out: output channels (and width of q, k, v).
        num_heads: number of heads.
        qkv_bias: bias in the q, k, v projection.
        norm_layer: normalisation after pooling.
        pool_kernel: kernel of the pooling convolutions.
        stride_q: pooling stride of the queries (the output is this much coarser).
        pool_queries: pool (and normalise) the queries; False requires ``stride_q`` 1.
        stride_kv: pooling stride of the keys and values.
        residual_pooling: add the pooled queries to the attention output.
        window_size: window size on the input grid (0: global attention). Query and key/value
            windows are this size divided by their strides, so they cover the same region.
        use_rel_pos: add the decomposed relative position bias.
        input_size: side of the (square) input grid the relative position tables are sized
            for; other sizes interpolate them.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        qkv_bias: bool = True,
        norm_layer=nn.LayerNorm,
        pool_kernel: Tuple[int, int] = (3, 3),
        stride_q: int = 1,
        stride_kv: int = 1,
        residual_pooling: bool = True,
        window_size: int = 0,
        use_rel_pos: bool = False,
        input_size: int = 56,
        pool_queries: bool = True,
    ):
        super().__init__()
        if not pool_queries and stride_q != 1:
            raise ValueError(f"query stride {stride_q} needs pool_queries=True.")
        if window_size and (window_size % stride_q or window_size % stride_kv):
            raise ValueError(
                f"window size {window_size} is not divisible by the query stride {stride_q} and "
                f"the key/value stride {stride_kv}; query and key windows would not align. RevMViT "
                "halves its window at every stage: make adaptive_window_size a multiple of 8 and "
                "of adaptive_kv_stride."
            )
        self.num_heads = num_heads
        head_dim = dim_out // num_heads
        self.qkv = nn.Linear(dim, 3 * dim_out, bias=qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)
        # One depthwise kernel per head channel, shared by the heads (MViTv2's "conv" pooling).
        conv = partial(
            nn.Conv2d,
            head_dim,
            head_dim,
            pool_kernel,
            padding=[k // 2 for k in pool_kernel],
            groups=head_dim,
            bias=False,
        )
        self.pool_q = conv(stride=stride_q) if pool_queries else None
        self.norm_q = norm_layer(head_dim) if pool_queries else None
        self.pool_k = conv(stride=stride_kv)
        self.norm_k = norm_layer(head_dim)
        self.pool_v = conv(stride=stride_kv)
        self.norm_v = norm_layer(head_dim)
        self.window_size = window_size
        self.q_window = window_size // stride_q
        self.kv_window = window_size // stride_kv
        self.residual_pooling = residual_pooling
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            # Sized as in MViTv2 checkpoints: for the finer of the query and key grids.
            length = 2 * max(input_size // stride_q, input_size // stride_kv) - 1
            self.rel_pos_h = nn.Parameter(torch.zeros(length, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(length, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h, w, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.reshape(3, b * self.num_heads, h, w, -1).unbind(0)
        if self.pool_q is not None:
            q = pool_tokens(q, self.pool_q, self.norm_q)
        k = pool_tokens(k, self.pool_k, self.norm_k)
        v = pool_tokens(v, self.pool_v, self.norm_v)
        pooled_q, q_grid = q, q.shape[1:3]
        if self.window_size:
            q, q_padded = window_partition(q, self.q_window)
            k, _ = window_partition(k, self.kv_window)
            v, _ = window_partition(v, self.kv_window)
            q_hw, k_hw = (self.q_window, self.q_window), (self.kv_window, self.kv_window)
        else:
            q_hw, k_hw = tuple(q_grid), tuple(k.shape[1:3])
        n, d = q.shape[0], q.shape[-1]
        # Heads and windows are folded into the batch: one head per attention call.
        q, k, v = (t.reshape(n, 1, -1, d) for t in (q, k, v))
        rel = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
        fold = _fold_pays(q_hw, k_hw)
        x = attention_with_rel_pos(q, k, v, q_hw, k_hw, *rel, fold=fold).reshape(n, *q_hw, d)
        if self.window_size:
            x = window_unpartition(x, self.q_window, q_padded, q_grid)
        if self.residual_pooling:
            x = x + pooled_q
        hq, wq = q_grid
        x = x.reshape(b, self.num_heads, hq, wq, d).permute(0, 2, 3, 1, 4).reshape(b, hq, wq, -1)
        return self.proj(x)

    def pool_like_queries(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H / s, W / s, C): ``x`` split into the heads as the queries are
        (C = heads * head width), pooled by ``pool_q`` and normalised by ``norm_q``, regrouped.

        The skip path of the paper's stage transitions (PySlowFast ``RES_PATH conv``)."""
        b, h, w, c = x.shape
        heads = x.reshape(b, h, w, self.num_heads, -1).permute(0, 3, 1, 2, 4)
        pooled = pool_tokens(heads.reshape(b * self.num_heads, h, w, -1), self.pool_q, self.norm_q)
        hq, wq = pooled.shape[1:3]
        return (
            pooled.reshape(b, self.num_heads, hq, wq, -1)
            .permute(0, 2, 3, 1, 4)
            .reshape(b, hq, wq, c)
        )


class RevMViTBlock(ReversibleBlock):
    """A stage-preserving MViTv2 block as a reversible block.

    ``F = norm1 + pooling attention`` (no query stride, same width) and
    ``G = norm2 + MLP``, each followed by drop path; the coupling ``Y1 = X1 + F(X2)``,
    ``Y2 = X2 + G(Y1)`` is the residual, so there is no skip inside F or G. (Residual pooling
    is part of the attention function, not a block skip.) In the "paper" layout the queries are
    not pooled (the paper's Rev-MViT pools them in stage transitions only).

    Args:
        dim: width of each stream.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: bias in the q, k, v projection.
        drop_path: drop path rate of F's and G's outputs.
        norm_layer: normalisation layer.
        act_layer: MLP activation.
        qkv_pool_kernel: kernel of the q, k, v pooling.
        stride_kv: key/value pooling stride.
        residual_pooling: add the pooled queries to the attention output.
        window_size: window attention size (0: global).
        use_rel_pos: add the decomposed relative position bias.
        input_size: side of the grid the relative position tables are sized for.
        layout: "mvitv2" or "paper" (see the module docstring).
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
        qkv_pool_kernel: Tuple[int, int] = (3, 3),
        stride_kv: int = 1,
        residual_pooling: bool = True,
        window_size: int = 0,
        use_rel_pos: bool = False,
        input_size: int = 56,
        layout: str = "mvitv2",
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = PoolingAttention(
            dim,
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            norm_layer=norm_layer,
            pool_kernel=qkv_pool_kernel,
            stride_kv=stride_kv,
            residual_pooling=residual_pooling,
            window_size=window_size,
            use_rel_pos=use_rel_pos,
            input_size=input_size,
            pool_queries=_check_layout(layout) == "mvitv2",
        )
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act_layer)

    def F(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.drop_path(self.attn(self.norm1(x)))

    def G(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802
        return self.drop_path(self.mlp(self.norm2(x)))


class StageTransitionBlock(nn.Module):
    """The first block of a stage: queries pooled with stride 2; not invertible.

    Its input is the concatenation of the previous stage's two streams, whose 2C channels are
    already the new stage's width, so attention maps 2C to 2C and the skip needs no projection.
    The two layouts differ in the fusion, the skip path and where drop path acts:

    * "mvitv2": the skip is a 3x3 stride-2 max pooling of the input (as in MViTv2); drop path
      acts on the two residual branches::

          x = MaxPool(x) + DropPath(Attention(norm1(x)))
          x = x + DropPath(MLP(norm2(x)))

    * "paper": the paper's released transition (PySlowFast ``PRE_Q_FUSION concat_linear_2``,
      ``RES_PATH conv``): the streams are fused by an MLP with a residual (``fuse``, hidden width
      twice the input's), the skip is the fused input pooled by the attention's own query
      pooling and norm (:meth:`PoolingAttention.pool_like_queries`), and drop path acts on the
      whole output, as the official block does (it zeroes whole feature maps of the dropped
      samples; kept so that the official checkpoint trains as it was trained)::

          x = x + MLP_fuse(x)
          x = QueryPool(x) + Attention(norm1(x))
          x = DropPath(x + MLP(norm2(x)))

    Args: as :class:`RevMViTBlock`; ``dim`` is the (fused input and output) width.
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
        qkv_pool_kernel: Tuple[int, int] = (3, 3),
        stride_kv: int = 1,
        residual_pooling: bool = True,
        window_size: int = 0,
        use_rel_pos: bool = False,
        input_size: int = 56,
        layout: str = "mvitv2",
    ):
        super().__init__()
        self.paper = _check_layout(layout) == "paper"
        if self.paper:
            self.fuse = Mlp(dim, 2 * dim, act=act_layer)
        self.norm1 = norm_layer(dim)
        self.attn = PoolingAttention(
            dim,
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            norm_layer=norm_layer,
            pool_kernel=qkv_pool_kernel,
            stride_q=_Q_STRIDE,
            stride_kv=stride_kv,
            residual_pooling=residual_pooling,
            window_size=window_size,
            use_rel_pos=use_rel_pos,
            input_size=input_size,
        )
        if not self.paper:
            self.pool_skip = nn.MaxPool2d(_Q_STRIDE + 1, _Q_STRIDE, (_Q_STRIDE + 1) // 2)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.paper:
            x = x + self.fuse(x)
            x = self.attn.pool_like_queries(x) + self.attn(self.norm1(x))
            return self.drop_path(x + self.mlp(self.norm2(x)))
        x = pool_tokens(x, self.pool_skip) + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(
            f"RevMViT layout {layout!r} is not valid; choose one of {LAYOUTS} "
            "(MODEL.REVMVIT.LAYOUT, or a size of that layout: MODEL.REVMVIT.SIZE)."
        )
    return layout


class RevMViT(Backbone, BackpropModule):
    """Reversible MViT trunk for detection: four stages at strides 4, 8, 16, 32.

    Layout (block indexes as in Detectron2's MViT, one global ``blocks`` list): the first block
    of stages 3 to 5 (``i - 1 in last_block_indexes``) is a :class:`StageTransitionBlock`
    (query stride 2, width and heads doubled, recomputed in backward); every other block keeps the
    shape and is a :class:`RevMViTBlock`, and each run of them between transitions is one
    reversible sequence (:func:`reversible_sequence`). Adaptive key/value strides:
    ``adaptive_kv_stride`` in stage 2, halved at every transition. In the "mvitv2" layout, window
    attention, the doubled key/value stride of the global last blocks of stages 3 and 4 and the
    relative position tables follow Detectron2's MViTv2 exactly; the "paper" layout (the paper's
    released Rev-MViT) pools queries in the transitions only, doubles no stride and has its own
    transition (:class:`StageTransitionBlock`).

    Streams and fusion: the patch tokens (and every transition's output) are duplicated into
    the two streams of the next reversible run. At the end of each stage the two C-channel
    streams are fused by concatenation into 2C channels: the paper's plain-concatenation lateral
    fusion, which its ablation places between the 2x- and 4x-MLP fusions in accuracy, and the
    only one without parameters. Concatenation loses nothing (X1 carries the attention updates
    and X2 the MLP updates) and its 2C channels are exactly the next stage's width, so the
    transition block's attention maps 2C to 2C with query stride 2 and its skip needs no
    projection: the channel doubling costs no extra layer. The same concatenation feeds the stage's output: ``scale{k}``
    is ``scale{k}_norm`` (a LayerNorm over the 2C channels, as RevViT's fusion) of it. Outputs
    therefore have twice the width of the stage: 192, 384, 768, 1536 channels for T/S/B (96
    wide), 288, 576, 1152, 2304 for L.

    Checkpoints: patch embedding, position embedding and every reversible block have MViTv2's
    names and shapes. A transition block has MViTv2's names but, being fed 2C channels, its
    ``norm1`` and ``attn.qkv`` take 2C inputs (MViTv2: C) and it has no ``proj``; Detectron2's
    checkpointer skips those (with a shape-mismatch warning) when loading an MViTv2 checkpoint.

    Args:
        img_size: input size the relative position tables are sized for (MViTv2 checkpoints:
            224); other sizes interpolate them.
        patch_kernel, patch_stride, patch_padding: the patch embedding convolution.
        in_chans: number of input image channels.
        embed_dim: width C of the first stage (doubled at every transition).
        depth: number of blocks.
        num_heads: attention heads of the first stage (doubled at every transition).
        last_block_indexes: the last block of each of the four stages.
        qkv_pool_kernel: kernel of the q, k, v pooling convolutions.
        adaptive_kv_stride: key/value pooling stride of the first stage.
        adaptive_window_size: window size of the first stage (halved at every transition);
            the last block of stages 3 to 5 uses global attention.
        residual_pooling: add the pooled queries to the attention output.
        mlp_ratio: MLP hidden width over the block width.
        qkv_bias: bias in the q, k, v projections.
        drop_path_rate: stochastic depth rate of the last block (linear from 0).
        norm_layer: normalisation of the blocks and the outputs.
        act_layer: MLP activation.
        use_abs_pos: add absolute position embeddings (from a pre-training grid, resized).
        use_rel_pos: add decomposed relative position bias in attention.
        pretrain_img_size: image size of the pre-training grid of ``pos_embed``.
        pretrain_use_cls_token: whether ``pos_embed`` has a class-token entry (dropped).
        layout: "mvitv2" (Detectron2's MViTv2 made reversible) or "paper" (the paper's
            released Rev-MViT); see the module docstring.
        backprop: "reversible", "autograd" or "checkpoint" (see :mod:`rev_det.reversible`). In
            "reversible" and "checkpoint" modes the transition blocks are recomputed in
            backward from their input (torch.utils.checkpoint) instead of stored.
        parallel_backward: on CUDA, overlap rebuilding and back-propagation of the reversible
            blocks on two CUDA streams (see :func:`rev_det.reversible.reversible_sequence`).
        out_features: which of "scale2" .. "scale5" to return.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_kernel: Tuple[int, int] = (7, 7),
        patch_stride: Tuple[int, int] = (4, 4),
        patch_padding: Tuple[int, int] = (3, 3),
        in_chans: int = 3,
        embed_dim: int = 96,
        depth: int = 24,
        num_heads: int = 1,
        last_block_indexes: Sequence[int] = (1, 4, 20, 23),
        qkv_pool_kernel: Tuple[int, int] = (3, 3),
        adaptive_kv_stride: int = 4,
        adaptive_window_size: int = 56,
        residual_pooling: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos: bool = False,
        use_rel_pos: bool = True,
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        layout: str = "mvitv2",
        backprop: str = "reversible",
        parallel_backward: bool = False,
        out_features: Sequence[str] = ("scale2", "scale3", "scale4", "scale5"),
    ):
        super().__init__()
        if depth < 4:
            raise ValueError(f"depth must be at least 4 (a block per stage), got {depth}.")
        last = tuple(last_block_indexes)
        if (
            len(last) != 4
            or list(last) != sorted(set(last))
            or last[0] < 0
            or last[-1] != depth - 1
        ):
            raise ValueError(
                f"last_block_indexes must be four increasing block indexes ending at depth - 1 "
                f"= {depth - 1} (one per stage), got {last}."
            )
        unknown = set(out_features) - {f"scale{s}" for s in range(2, 6)}
        if unknown:
            raise ValueError(f"unknown out_features {sorted(unknown)}; choose from scale2..scale5.")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}.")
        self.layout = _check_layout(layout)
        self.in_chans = in_chans
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self._size_divisibility = max(patch_stride) * _Q_STRIDE**3
        self.patch_embed = ConvPatchEmbed(
            patch_kernel, patch_stride, patch_padding, in_chans, embed_dim
        )
        if use_abs_pos:
            num_patches = (pretrain_img_size // patch_stride[0]) * (
                pretrain_img_size // patch_stride[1]
            )
            num_positions = num_patches + 1 if pretrain_use_cls_token else num_patches
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:
            self.pos_embed = None

        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        dim, heads = embed_dim, num_heads
        stride_kv, window = adaptive_kv_stride, adaptive_window_size
        grid = img_size // patch_stride[0]
        blocks = []
        for i in range(depth):
            transition = i - 1 in last
            if transition:
                dim, heads, stride_kv = 2 * dim, 2 * heads, max(stride_kv // 2, 1)
            # MViTv2's hybrid window attention: global attention in the last block of stages 3
            # to 5, with keys and values pooled twice as much in stages 3 and 4 (MViTv2 only).
            is_global = i in last[1:]
            doubled = layout == "mvitv2" and i in last[1:3]
            kind = StageTransitionBlock if transition else RevMViTBlock
            blocks.append(
                kind(
                    dim,
                    heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=rates[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    qkv_pool_kernel=qkv_pool_kernel,
                    stride_kv=2 * stride_kv if doubled else stride_kv,
                    residual_pooling=residual_pooling,
                    window_size=0 if is_global else window,
                    use_rel_pos=use_rel_pos,
                    input_size=grid,
                    layout=layout,
                )
            )
            if transition:
                window, grid = window // 2, grid // 2
        self.blocks = nn.ModuleList(blocks)
        self._last_block_indexes = last
        self.backprop = backprop
        self.parallel_backward = parallel_backward

        self._out_features = list(out_features)
        self._out_feature_channels, self._out_feature_strides = {}, {}
        for stage in range(4):
            name = f"scale{stage + 2}"
            if name in out_features:
                channels = 2 * embed_dim * 2**stage  # the concatenated streams
                self._out_feature_channels[name] = channels
                self._out_feature_strides[name] = patch_stride[0] * _Q_STRIDE**stage
                self.add_module(f"{name}_norm", norm_layer(channels))
        init_vit_weights(self, self.pos_embed)
        logger.info(
            "RevMViT (%s layout): %d blocks, stage transitions (recomputed) at %s, the rest "
            "reversible; backprop=%r.",
            layout,
            depth,
            [i + 1 for i in last[:-1]],
            backprop,
        )

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> Dict[str, Any]:
        """The constructor arguments from ``cfg.MODEL.REVMVIT`` and ``cfg.MODEL.REV``
        (Detectron2's ``from_config``): the one place that reads this trunk's config keys.

        The size is the row of :data:`REVMVIT_SIZES` that ``MODEL.REVMVIT.SIZE`` names, and any
        of its keys the config sets wins over it (see
        :func:`~rev_det.modeling.trunk_args.size_args`).

        Args:
            cfg: a Detectron2 config with rev_det's keys.
            input_shape: the images' shape; its ``channels`` is ``in_chans``.

        Returns:
            dict: keyword arguments of :class:`RevMViT`.
        """
        c = cfg.MODEL.REVMVIT
        return dict(
            img_size=c.IMG_SIZE,
            in_chans=input_shape.channels,
            **size_args(c, "MODEL.REVMVIT", REVMVIT_SIZES),
            adaptive_kv_stride=c.ADAPTIVE_KV_STRIDE,
            adaptive_window_size=c.ADAPTIVE_WINDOW_SIZE,
            residual_pooling=c.RESIDUAL_POOLING,
            mlp_ratio=c.MLP_RATIO,
            qkv_bias=c.QKV_BIAS,
            use_abs_pos=c.USE_ABS_POS,
            use_rel_pos=c.USE_REL_POS,
            **backprop_args(cfg),
            out_features=tuple(c.OUT_FEATURES),
        )

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self._size_divisibility}

    def _transition(self, block: StageTransitionBlock, x: torch.Tensor) -> torch.Tensor:
        # A transition is not invertible, but its input (the fused stage output) is kept
        # anyway, so recomputing it in backward costs no memory: stored, the transitions
        # would hold most of the trunk's activations (docs/models.md).
        return run_recomputed(self.recomputes(), block, x)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        check_image(x, self.in_chans, self._size_divisibility, "RevMViT", "")
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + resize_abs_pos(self.pos_embed, self.pretrain_use_cls_token, x.shape[1:3])
        outputs = {}
        ends = self._last_block_indexes
        for stage, last in enumerate(ends):
            # The stage's reversible run: after its transition block (stages 3 to 5) to its end.
            first = ends[stage - 1] + 2 if stage else 0
            blocks = list(self.blocks[first : last + 1])
            x1, x2 = reversible_sequence(blocks, x, x, self.backprop, self.parallel_backward)
            fused = torch.cat([x1, x2], dim=-1)
            name = f"scale{stage + 2}"
            if name in self._out_features:
                outputs[name] = getattr(self, f"{name}_norm")(fused).permute(0, 3, 1, 2)
            if last + 1 < len(self.blocks):
                x = self._transition(self.blocks[last + 1], fused)
        return outputs
