"""Attention pieces shared by RevViT and RevMViT: relative position bias, windows, MLP.

All attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`, so no
N x N attention matrix is kept for backward. The decomposed relative position bias of ViTDet /
MViTv2 adds, to the score of query i and key j, ``q_i . Rh[h_i, h_j] + q_i . Rw[w_i, w_j]``.
Materialised as an N x N mask it would bring the N x N memory back (805 MB per global ViT-B
block at 1024x1024), so for large N it is folded into the dot product instead: each query gets
its row and column bias vectors appended, each key the one-hot of its row and column, and the
softmax scale is applied to q beforehand. The fused kernels then see plain q, k, v.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Mlp",
    "rel_pos_table",
    "rel_pos_bias",
    "full_rel_pos_bias",
    "attention_with_rel_pos",
    "window_partition",
    "window_unpartition",
    "tokens_from_map",
    "resize_abs_pos",
    "init_vit_weights",
    "check_image",
]


class Mlp(nn.Module):
    """fc1 -> activation -> fc2, named as in ViT so checkpoints load by name."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: Optional[int] = None, act=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def rel_pos_table(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for every (query, key) pair along one axis.

    Args:
        q_size, k_size: number of query and key positions along the axis (they differ when
            keys are pooled); coordinates are scaled to the finer of the two grids.
        table: (L, C) learned embeddings; resized linearly if L != 2 * max(q_size, k_size) - 1.

    Returns:
        (q_size, k_size, C) tensor.
    """
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t()[None], size=length, mode="linear")[0].t()
    q_scale, k_scale = max(k_size / q_size, 1.0), max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=table.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=table.device)[None, :] * k_scale
    offset = (k_size - 1) * k_scale
    return table[(q_coords - k_coords + offset).long()]


def rel_pos_bias(
    q: torch.Tensor,
    q_hw: Tuple[int, int],
    k_hw: Tuple[int, int],
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each query's decomposed relative position bias towards the key rows and columns.

    Args:
        q: (B, heads, Nq, d) queries on a grid of ``q_hw``; keys lie on a grid of ``k_hw``.
        rel_pos_h, rel_pos_w: relative position tables (see :func:`rel_pos_table`).

    Returns:
        (B, heads, Nq, kh) and (B, heads, Nq, kw): ``q_i . Rh[h_i, row]``, ``q_i . Rw[w_i, col]``.
    """
    (qh, qw), (kh, kw) = q_hw, k_hw
    b, heads, nq, d = q.shape
    rh = rel_pos_table(qh, kh, rel_pos_h).to(q.dtype)
    rw = rel_pos_table(qw, kw, rel_pos_w).to(q.dtype)
    q_grid = q.reshape(b, heads, qh, qw, d)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rh).reshape(b, heads, nq, kh)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rw).reshape(b, heads, nq, kw)
    return bias_h, bias_w


def full_rel_pos_bias(bias_h: torch.Tensor, bias_w: torch.Tensor) -> torch.Tensor:
    """(B, heads, Nq, kh) and (B, heads, Nq, kw) -> the (B, heads, Nq, kh * kw) bias (N x N)."""
    b, heads, nq, kh = bias_h.shape
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(
        b, heads, nq, kh * bias_w.shape[-1]
    )


def attention_with_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_hw: Tuple[int, int],
    k_hw: Tuple[int, int],
    rel_pos_h: Optional[torch.Tensor] = None,
    rel_pos_w: Optional[torch.Tensor] = None,
    fold: bool = False,
) -> torch.Tensor:
    """Scaled dot-product attention with an optional decomposed relative position bias.

    Args:
        q: (B, heads, Nq, d) queries on a grid of ``q_hw``; k, v: (B, heads, Nk, d) on ``k_hw``.
        rel_pos_h, rel_pos_w: relative position tables (see :func:`rel_pos_table`), or None.
        fold: fold the bias into q and k (O(N (H + W)) memory, head dim grows by kh + kw)
            instead of passing it as an explicit (Nq, Nk) mask. Use it where N is large.

    Returns:
        (B, heads, Nq, d).
    """
    if rel_pos_h is None:
        return F.scaled_dot_product_attention(q, k, v)
    bias_h, bias_w = rel_pos_bias(q, q_hw, k_hw, rel_pos_h, rel_pos_w)
    if not fold:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=full_rel_pos_bias(bias_h, bias_w))
    (kh, kw), d = k_hw, q.shape[-1]
    rows = torch.arange(kh * kw, device=q.device) // kw
    cols = torch.arange(kh * kw, device=q.device) % kw
    one_hot = torch.cat([F.one_hot(rows, kh), F.one_hot(cols, kw)], dim=1).to(q.dtype)
    q = torch.cat([q * (d**-0.5), bias_h, bias_w], dim=-1)
    k = torch.cat([k, one_hot.expand(*k.shape[:2], -1, -1)], dim=-1)
    v = F.pad(v, (0, kh + kw))  # fused kernels need one head dim for q, k and v
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :d]


def window_partition(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Split (B, H, W, C) into (B * num_windows, window, window, C), zero-padding H and W.

    Returns:
        The windows and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, window, window, C) -> (B, H, W, C)."""
    (hp, wp), (h, w) = padded_hw, hw
    b = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(b, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w].contiguous()


def tokens_from_map(x: torch.Tensor) -> torch.Tensor:
    """A convolution's or pooling's (B, C, H, W) output as dense (B, H, W, C) tokens.

    Dense, not a permuted view: the reversible streams take their strides from the tokens
    through every coupling (an element-wise result takes its first input's layout), and
    channels-first strides would make every LayerNorm and Linear of every block copy its input
    (measurably slower reversible blocks on CPU). No copy for a
    channels-last map (a pooling of a token grid's channels-last view).
    """
    return x.permute(0, 2, 3, 1).contiguous()


def resize_abs_pos(pos_embed: torch.Tensor, has_cls_token: bool, hw: Tuple[int, int]):
    """Absolute position embeddings of a square pre-training grid, resized to ``hw``.

    Args:
        pos_embed: (1, L, C), L = S * S (+ 1 with a class token).
        has_cls_token: drop the first embedding (classification token) if True.
        hw: the target grid (h, w).

    Returns:
        (1, h, w, C).
    """
    if has_cls_token:
        pos_embed = pos_embed[:, 1:]
    size = int(math.isqrt(pos_embed.shape[1]))
    if size * size != pos_embed.shape[1]:
        raise ValueError(f"position embedding of {pos_embed.shape[1]} tokens is not a square grid")
    grid = pos_embed.reshape(1, size, size, -1)
    if (size, size) != tuple(hw):
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1)
    return grid


def init_vit_weights(model: nn.Module, pos_embed: Optional[torch.Tensor] = None):
    """ViT initialisation: truncated normal (std 0.02) for linear layers and position
    embeddings, zero biases, unit LayerNorms."""
    if pos_embed is not None:
        nn.init.trunc_normal_(pos_embed, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_image(x: torch.Tensor, in_chans: int, divisor: int, owner: str, what: str):
    """Raise a ValueError that names the problem and the fix for a batch a trunk cannot take.

    Args:
        x: the (B, C, H, W) batch.
        in_chans: the channels the trunk expects.
        divisor: H and W must be positive multiples of it.
        owner: the trunk's name, for the message.
        what: what ``divisor`` is, for the message (e.g. "the patch size").
    """
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"{owner} expects images of shape (B, {in_chans}, H, W), got {tuple(x.shape)}; "
            f"convert grayscale/RGBA images to {in_chans} channels (Detectron2: INPUT.FORMAT "
            "and MODEL.PIXEL_MEAN/PIXEL_STD)."
        )
    h, w = x.shape[-2:]
    if h < divisor or w < divisor or h % divisor or w % divisor:
        raise ValueError(
            f"{owner} needs H and W to be positive multiples of {what}{divisor}, got {h}x{w}; "
            "pad the images to a multiple of the backbone's size_divisibility, as Detectron2's "
            "models do."
        )
