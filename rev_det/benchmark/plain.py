"""The classification section's baselines: the non-reversible model of each reversible layout.

The paper compares each reversible model with the ordinary residual network of the same layout
(ViT-B against Rev-ViT-B, MViT-B against Rev-MViT-B), not with the reversible one run with
autograd. These plain models reuse the reversible models' modules, run as residual blocks on one
stream of the stage's width (``x = x + F(x)``, then ``x = x + G(x)``), ending in one LayerNorm
over that width:

* :class:`PlainViT`: ViT, from :class:`~rev_det.modeling.RevViT`'s patch embedding and blocks;
* :class:`PlainMViT`: MViT of the paper layout (Rev-MViT-B's: absolute positions, queries pooled
  in the stage transitions only, key/value strides halved at each transition), whose transition
  blocks double the width in their attention and project and max-pool their skip, as MViTv2's
  (and Detectron2's MViT) blocks do.
"""

from functools import partial
from typing import Dict

import torch
from torch import nn
from torchvision.ops import StochasticDepth

from rev_det.modeling import REVMVIT_SIZES, RevViT
from rev_det.modeling.attention import Mlp, init_vit_weights, resize_abs_pos
from rev_det.modeling.rev_mvit import ConvPatchEmbed, PoolingAttention, pool_tokens

__all__ = ["PlainViT", "PlainMViT", "PlainMViTBlock"]

_NORM = partial(nn.LayerNorm, eps=1e-6)


def _residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A reversible block's F and G as the two residual branches of an ordinary block."""
    x = x + block.F(x)
    return x + block.G(x)


class PlainViT(nn.Module):
    """ViT with RevViT's modules (same patch embedding, blocks and attention layout), one stream.

    Args: as :class:`~rev_det.modeling.RevViT` (``backprop`` is fixed: autograd).

    Returns from ``forward``: ``{"last_feat": (B, C, H / p, W / p)}``, normalised.
    """

    def __init__(self, embed_dim: int, **kwargs):
        super().__init__()
        self.trunk = RevViT(embed_dim=embed_dim, backprop="autograd", **kwargs)
        del self.trunk.norm  # RevViT's LayerNorm over its two streams
        self.norm = _NORM(embed_dim)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.trunk.tokens(x)
        for block in self.trunk.blocks:
            x = _residual(block, x)
        return {"last_feat": self.norm(x).permute(0, 3, 1, 2)}


class PlainMViTBlock(nn.Module):
    """An MViT block: attention with pooling and a residual skip, then an MLP.

    ``skip = MaxPool(proj(norm1(x)))`` where the width (``dim -> dim_out``) or the resolution
    (``stride_q``) changes, else ``x``; ``x = skip + DropPath(Attention(norm1(x)))``,
    ``x = x + DropPath(MLP(norm2(x)))``.

    Args:
        dim, dim_out: input and output width.
        num_heads: attention heads.
        stride_q, stride_kv: query and key/value pooling strides.
        drop_path: drop path rate of both branches.
    """

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        stride_q: int = 1,
        stride_kv: int = 1,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = _NORM(dim)
        self.attn = PoolingAttention(
            dim,
            dim_out,
            num_heads,
            norm_layer=_NORM,
            stride_q=stride_q,
            stride_kv=stride_kv,
            residual_pooling=False,
            pool_queries=stride_q > 1,
        )
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.pool_skip = nn.MaxPool2d(stride_q + 1, stride_q, 1) if stride_q > 1 else None
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = _NORM(dim_out)
        self.mlp = Mlp(dim_out, 4 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        skip = self.proj(normed) if self.proj is not None else x
        if self.pool_skip is not None:
            skip = pool_tokens(skip, self.pool_skip)
        x = skip + self.drop_path(self.attn(normed))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PlainMViT(nn.Module):
    """MViT in the paper layout of a :data:`~rev_det.modeling.REVMVIT_SIZES` row: the same
    patch embedding, absolute positions, depth, widths, heads, stage ends, drop path and
    pooling strides as the reversible model, global attention.

    Args:
        size: a row of :data:`~rev_det.modeling.REVMVIT_SIZES` (e.g. "paper_b").
        img_size: the input (and position grid) size.
        adaptive_kv_stride: key/value stride of the first stage.

    Returns from ``forward``: ``{"scale5": (B, 8C, H / 32, W / 32)}``, normalised.
    """

    def __init__(self, size: str = "paper_b", img_size: int = 224, adaptive_kv_stride: int = 4):
        super().__init__()
        row = REVMVIT_SIZES[size]
        dim, heads, depth = row["embed_dim"], row["num_heads"], row["depth"]
        last = row["last_block_indexes"]
        self.patch_embed = ConvPatchEmbed(embed_dim=dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // 4) ** 2, dim))
        rates = [row["drop_path_rate"] * i / max(depth - 1, 1) for i in range(depth)]
        blocks, stride_kv = [], adaptive_kv_stride
        for i in range(depth):
            transition = i - 1 in last
            stride_kv = max(stride_kv // 2, 1) if transition else stride_kv
            dim_out, heads = (2 * dim, 2 * heads) if transition else (dim, heads)
            stride_q = 2 if transition else 1
            blocks.append(PlainMViTBlock(dim, dim_out, heads, stride_q, stride_kv, rates[i]))
            dim = dim_out
        self.blocks = nn.ModuleList(blocks)
        self.norm = _NORM(dim)
        init_vit_weights(self, self.pos_embed)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.patch_embed(x)
        x = x + resize_abs_pos(self.pos_embed, False, x.shape[1:3])
        for block in self.blocks:
            x = block(x)
        return {"scale5": self.norm(x).permute(0, 3, 1, 2)}
