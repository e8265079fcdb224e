"""Checkpoint converters (rev_det.convert, tools/convert_pretrained.py).

The official weights cannot be downloaded here, so each test synthesises a state dict with the
source project's key names and shapes for a small model, following the rules of that project's
model definition (PySlowFast's ReversibleMViT, mmpretrain's RevVisionTransformer, timm's
VisionTransformer, facebookresearch/mvit's MViT), converts it, loads it into a rev_det trunk and
compares, where the semantics coincide, rev_det's computation with a reference written here
from the source layout.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script

from rev_det.convert import (
    Conversion,
    ConversionError,
    build_target_trunk,
    convert_mmpretrain_revvit,
    convert_mvitv2,
    convert_pyslowfast_revmvit,
    convert_pyslowfast_revvit,
    convert_vit,
    extract_state_dict,
    save_detectron2_checkpoint,
)
from rev_det.modeling import REVMVIT_PAPER_OPTIONS, RevMViT, RevViT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "convert_pretrained.py")
DEMO_YAML = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.yaml")
DEMO_PY = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.py")
DEMO_MVIT_YAML = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_mvit_demo.yaml")
EPS = 1e-6  # every source uses LayerNorm(eps=1e-6)


class Weights(dict):
    """A state dict filled with deterministic random tensors by shape."""

    def __init__(self, seed: int):
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, key: str, *shape: int):
        self[key] = torch.randn(*shape, generator=self.gen) * 0.3

    def linear(self, key: str, out: int, inp: int, bias: bool = True):
        self.add(key + ".weight", out, inp)
        if bias:
            self.add(key + ".bias", out)

    def norm(self, key: str, dim: int):
        self[key + ".weight"] = 1 + torch.randn(dim, generator=self.gen) * 0.1
        self.add(key + ".bias", dim)


# ---------------------------------------------------------------------------------------------
# Source layouts, synthesised


def timm_vit(dim, depth, heads, patch, grid, layer_scale=False, seed=0):
    """timm / MAE ViT: class token, pos_embed with its entry, fused qkv, final norm, head."""
    w = Weights(seed)
    w.add("cls_token", 1, 1, dim)
    w.add("pos_embed", 1, 1 + grid * grid, dim)
    w.add("patch_embed.proj.weight", dim, 3, patch, patch)
    w.add("patch_embed.proj.bias", dim)
    for i in range(depth):
        p = f"blocks.{i}."
        w.norm(p + "norm1", dim)
        w.linear(p + "attn.qkv", 3 * dim, dim)
        w.linear(p + "attn.proj", dim, dim)
        w.norm(p + "norm2", dim)
        w.linear(p + "mlp.fc1", 4 * dim, dim)
        w.linear(p + "mlp.fc2", dim, 4 * dim)
        if layer_scale:
            w.add(p + "ls1.gamma", dim)
            w.add(p + "ls2.gamma", dim)
    w.norm("norm", dim)
    w.linear("head", 10, dim)
    return w


def pyslowfast_revvit(dim, depth, patch, grid, video=False, seed=0):
    """PySlowFast MViT with MVIT.REV.ENABLE and no pooling (REV_VIT_*.yaml): SEPARATE_QKV,
    CLS_EMBED_ON False, RESPATH_FUSE concat; ``video``: a Conv3d patch embedding with one
    temporal tap and separate spatial / temporal position embeddings (SEP_POS_EMBED)."""
    w = Weights(seed)
    if video:
        w.add("patch_embed.proj.weight", dim, 3, 1, patch, patch)
        w.add("pos_embed_spatial", 1, grid * grid, dim)
        w.add("pos_embed_temporal", 1, 1, dim)
    else:
        w.add("patch_embed.proj.weight", dim, 3, patch, patch)
        w.add("pos_embed", 1, grid * grid, dim)
    w.add("patch_embed.proj.bias", dim)
    for i in range(depth):
        p = f"rev_backbone.layers.{i}."
        w.norm(p + "F.norm", dim)
        for x in "qkv":
            w.linear(p + f"F.attn.{x}", dim, dim)
        w.linear(p + "F.attn.proj", dim, dim)
        w.norm(p + "G.norm", dim)
        w.linear(p + "G.mlp.fc1", 4 * dim, dim)
        w.linear(p + "G.mlp.fc2", dim, 4 * dim)
    w.norm("norm", 2 * dim)
    w.linear("head.projection", 10, 2 * dim)
    return w


def mmpretrain_revvit(dim, depth, patch, grid, seed=0):
    """mmpretrain ImageClassifier with a RevVisionTransformer backbone (``backbone.`` prefix)."""
    w = Weights(seed)
    b = "backbone."
    w.add(b + "cls_token", 1, 1, dim)
    w.add(b + "pos_embed", 1, 1 + grid * grid, dim)
    w.add(b + "patch_embed.projection.weight", dim, 3, patch, patch)
    w.add(b + "patch_embed.projection.bias", dim)
    for i in range(depth):
        p = f"{b}layers.{i}."
        w.norm(p + "ln1", dim)
        w.linear(p + "attn.qkv", 3 * dim, dim)
        w.linear(p + "attn.proj", dim, dim)
        w.norm(p + "ln2", dim)
        w.linear(p + "ffn.layers.0.0", 4 * dim, dim)
        w.linear(p + "ffn.layers.1", dim, 4 * dim)
    w.norm(b + "ln1", 2 * dim)
    w.linear("head.fc", 10, 2 * dim)
    return w


def pyslowfast_revmvit(dim, heads, depth, transitions, grid, seed=0):
    """PySlowFast Rev-MViT (REV_MVIT_B_16_CONV.yaml rules): DIM_MUL = HEAD_MUL = 2 and q stride
    at the transitions (BUFFER_LAYERS), kv pooling everywhere (POOL_KV_STRIDE_ADAPTIVE), Conv3d
    pooling kernels (1, 3, 3), PRE_Q_FUSION concat_linear_2, SEPARATE_QKV, absolute position
    embedding without class token, final norm over the concatenated streams."""
    w = Weights(seed)
    w.add("patch_embed.proj.weight", dim, 3, 7, 7)
    w.add("patch_embed.proj.bias", dim)
    w.add("pos_embed", 1, grid * grid, dim)
    width = dim
    for i in range(depth):
        p = f"rev_backbone.layers.{i}."
        transition = i in transitions
        if transition:
            heads *= 2
        dim_in = 2 * width if transition else width  # concat fusion feeds both streams
        dim_out = 2 * width if transition else width
        head_dim = dim_out // heads
        if transition:
            w.linear(p + "pre_q_fuse.fuse_fn.fc1", 2 * dim_in, dim_in)
            w.linear(p + "pre_q_fuse.fuse_fn.fc2", dim_in, 2 * dim_in)
        w.norm(p + "F.norm", dim_in)
        for x in "qkv":
            w.linear(p + f"F.attn.{x}", dim_out, dim_in)
        w.linear(p + "F.attn.proj", dim_out, dim_out)
        for x in ("qkv" if transition else "kv"):
            w.add(p + f"F.attn.pool_{x}.weight", head_dim, 1, 1, 3, 3)
            w.norm(p + f"F.attn.norm_{x}", head_dim)
        w.norm(p + "G.norm", dim_out)
        w.linear(p + "G.mlp.fc1", 4 * dim_out, dim_out)
        w.linear(p + "G.mlp.fc2", dim_out, 4 * dim_out)
        width = dim_out
    w.norm("norm", 2 * width)
    w.linear("head.projection", 10, 2 * width)
    return w


def mvitv2(dim, heads, depth, transitions, grid, kv_stride, cls_token=True, seed=0):
    """facebookresearch/mvit MViTv2 (MVITv2_*.yaml rules): DIM_MUL_IN_ATT, q pooling in every
    block (stride 2 at transitions), adaptive kv stride halved at transitions, relative position
    tables sized ``2 * max(q_size, kv_size) - 1`` on the block's input grid, skip projection
    ``proj`` where the width changes."""
    w = Weights(seed)
    w.add("patch_embed.proj.weight", dim, 3, 7, 7)
    w.add("patch_embed.proj.bias", dim)
    if cls_token:
        w.add("cls_token", 1, 1, dim)
    size = grid
    for i in range(depth):
        p = f"blocks.{i}."
        stride_q = 2 if i in transitions else 1
        dim_out = dim * stride_q
        heads *= stride_q
        kv_stride = max(kv_stride // stride_q, 1)
        head_dim = dim_out // heads
        w.norm(p + "norm1", dim)
        w.linear(p + "attn.qkv", 3 * dim_out, dim)
        w.linear(p + "attn.proj", dim_out, dim_out)
        for x in "qkv":
            w.add(p + f"attn.pool_{x}.weight", head_dim, 1, 3, 3)
            w.norm(p + f"attn.norm_{x}", head_dim)
        length = 2 * max(size // stride_q, size // kv_stride) - 1
        w.add(p + "attn.rel_pos_h", length, head_dim)
        w.add(p + "attn.rel_pos_w", length, head_dim)
        w.norm(p + "norm2", dim_out)
        w.linear(p + "mlp.fc1", 4 * dim_out, dim_out)
        w.linear(p + "mlp.fc2", dim_out, 4 * dim_out)
        if dim != dim_out:
            w.linear(p + "proj", dim_out, dim)
        size //= stride_q
        dim = dim_out
    w.norm("norm", dim)
    w.linear("head.projection", 10, dim)
    return w


# ---------------------------------------------------------------------------------------------
# Reference computations, written from the source layouts


def ln(x, w, key):
    return F.layer_norm(x, x.shape[-1:], w[key + ".weight"], w[key + ".bias"], EPS)


def lin(x, w, key):
    return F.linear(x, w[key + ".weight"], w.get(key + ".bias"))


def mlp(x, w, fc1, fc2):
    return lin(F.gelu(lin(x, w, fc1)), w, fc2)


def softmax_attention(q, k, v, heads, bias=None):
    """q (B, Nq, heads * d), k, v (B, Nk, heads * d) -> (B, Nq, heads * d)."""
    b, nq, c = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, nq, c)


def vit_attention_branch(x, w, i, heads):
    """timm Block: ls1(attn(norm1(x))), x of shape (B, N, C)."""
    p = f"blocks.{i}."
    q, k, v = lin(ln(x, w, p + "norm1"), w, p + "attn.qkv").chunk(3, dim=-1)
    out = lin(softmax_attention(q, k, v, heads), w, p + "attn.proj")
    return out * w[p + "ls1.gamma"] if p + "ls1.gamma" in w else out


def vit_mlp_branch(x, w, i):
    p = f"blocks.{i}."
    out = mlp(ln(x, w, p + "norm2"), w, p + "mlp.fc1", p + "mlp.fc2")
    return out * w[p + "ls2.gamma"] if p + "ls2.gamma" in w else out


def reversible_reference(tokens, depth, f, g, final_norm):
    """PySlowFast / mmpretrain forward: streams start as copies, Y1 = X1 + F(X2),
    Y2 = X2 + G(Y1), then a LayerNorm over cat([X1, X2])."""
    x1 = x2 = tokens
    for i in range(depth):
        x1 = x1 + f(i, x2)
        x2 = x2 + g(i, x1)
    return final_norm(torch.cat([x1, x2], dim=-1))


def pyslowfast_revvit_forward(image, w, depth, heads, patch):
    weight = w["patch_embed.proj.weight"]
    weight = weight[:, :, 0] if weight.dim() == 5 else weight  # one frame
    x = F.conv2d(image, weight, w["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    if "pos_embed" in w:
        x = x + w["pos_embed"]
    else:
        x = x + w["pos_embed_spatial"] + w["pos_embed_temporal"]

    def f(i, x):
        p = f"rev_backbone.layers.{i}.F."
        h = ln(x, w, p + "norm")
        q, k, v = (lin(h, w, p + f"attn.{n}") for n in "qkv")
        return lin(softmax_attention(q, k, v, heads), w, p + "attn.proj")

    def g(i, x):
        p = f"rev_backbone.layers.{i}.G."
        return mlp(ln(x, w, p + "norm"), w, p + "mlp.fc1", p + "mlp.fc2")

    return reversible_reference(x, depth, f, g, lambda x: ln(x, w, "norm"))


def mmpretrain_revvit_forward(image, w, depth, heads, patch):
    b = "backbone."
    x = F.conv2d(
        image,
        w[b + "patch_embed.projection.weight"],
        w[b + "patch_embed.projection.bias"],
        stride=patch,
    )
    x = x.flatten(2).transpose(1, 2) + w[b + "pos_embed"][:, 1:]  # class entry dropped

    def f(i, x):
        p = f"{b}layers.{i}."
        q, k, v = lin(ln(x, w, p + "ln1"), w, p + "attn.qkv").chunk(3, dim=-1)
        return lin(softmax_attention(q, k, v, heads), w, p + "attn.proj")

    def g(i, x):
        p = f"{b}layers.{i}."
        return mlp(ln(x, w, p + "ln2"), w, p + "ffn.layers.0.0", p + "ffn.layers.1")

    return reversible_reference(x, depth, f, g, lambda x: ln(x, w, b + "ln1"))


def pooled(t, hw, conv_weight, stride, w, norm_key):
    """Pool (B, heads, N, d) per head with a depthwise conv (2D, or 3D over one frame), then
    LayerNorm; returns the pooled tensor and its grid."""
    b, heads, _, d = t.shape
    grid = t.reshape(b * heads, *hw, d).permute(0, 3, 1, 2)
    if conv_weight.dim() == 5:  # PySlowFast: Conv3d over a one-frame clip
        clip = grid[:, :, None]
        out = F.conv3d(clip, conv_weight, stride=(1, stride, stride), padding=(0, 1, 1), groups=d)
        out = out[:, :, 0]
    else:
        out = F.conv2d(grid, conv_weight, stride=stride, padding=1, groups=d)
    new_hw = out.shape[-2:]
    out = out.reshape(b, heads, d, -1).transpose(2, 3)
    return ln(out, w, norm_key), tuple(new_hw)


def pyslowfast_attention(x, hw, w, p, heads, stride_q, stride_kv):
    """PySlowFast MultiScaleAttention (conv mode, separate q/k/v, no class token, no relative
    position, no residual pooling) on (B, N, C)."""
    b, n, _ = x.shape
    q, k, v = (lin(x, w, p + f"attn.{n_}").reshape(b, n, heads, -1).transpose(1, 2) for n_ in "qkv")
    q_hw = hw
    if p + "attn.pool_q.weight" in w:  # Rev-MViT pools queries in its transitions only
        q, q_hw = pooled(q, hw, w[p + "attn.pool_q.weight"], stride_q, w, p + "attn.norm_q")
    k, _ = pooled(k, hw, w[p + "attn.pool_k.weight"], stride_kv, w, p + "attn.norm_k")
    v, _ = pooled(v, hw, w[p + "attn.pool_v.weight"], stride_kv, w, p + "attn.norm_v")
    out = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
    out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
    return lin(out, w, p + "attn.proj"), q_hw


def pyslowfast_revmvit_forward(image, w, depth, transitions, heads, kv_stride):
    """PySlowFast's MViT with MVIT.REV.ENABLE, eval mode, REV_MVIT_B_16_CONV's rules, written
    from its module structure: patch embedding (7x7, stride 4) + pos_embed; reversible stacks
    (both halves the stack's input, ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``, output
    ``[Y1, Y2]``); stage transitions (BUFFER_LAYERS) on the concatenation: ``pre_q_fuse``
    (x + MLP), skip = x pooled per head by ``F.attn.pool_q`` + ``norm_q`` (RES_PATH conv),
    ``x = skip + F(x)``, ``x = x + G(x)``; heads doubled and the key/value stride halved at each
    transition (POOL_KV_STRIDE_ADAPTIVE); ``norm`` over the final concatenation. Returns the
    final normalised tokens (B, N, 2C)."""
    x = F.conv2d(image, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], 4, 3)
    hw = tuple(x.shape[-2:])
    x = tokens(x) + w["pos_embed"]
    streams = None
    for i in range(depth):
        p = f"rev_backbone.layers.{i}."
        if i in transitions:
            heads, kv_stride = 2 * heads, max(kv_stride // 2, 1)
            x = torch.cat(streams, dim=-1)
            x = x + mlp(x, w, p + "pre_q_fuse.fuse_fn.fc1", p + "pre_q_fuse.fuse_fn.fc2")
            b, n, c = x.shape
            split = x.reshape(b, n, heads, c // heads).transpose(1, 2)
            skip, _ = pooled(split, hw, w[p + "F.attn.pool_q.weight"], 2, w, p + "F.attn.norm_q")
            skip = skip.transpose(1, 2).reshape(b, -1, c)
            out, hw = pyslowfast_attention(
                ln(x, w, p + "F.norm"), hw, w, p + "F.", heads, 2, kv_stride
            )
            x = skip + out
            x = x + mlp(ln(x, w, p + "G.norm"), w, p + "G.mlp.fc1", p + "G.mlp.fc2")
            streams = None
            continue
        x1, x2 = streams if streams is not None else (x, x)
        out, _ = pyslowfast_attention(ln(x2, w, p + "F.norm"), hw, w, p + "F.", heads, 1, kv_stride)
        y1 = x1 + out
        y2 = x2 + mlp(ln(y1, w, p + "G.norm"), w, p + "G.mlp.fc1", p + "G.mlp.fc2")
        streams = (y1, y2)
    return ln(torch.cat(streams, dim=-1), w, "norm")


def mvitv2_attention(x, hw, w, p, heads, stride_q, stride_kv):
    """facebookresearch/mvit MultiScaleAttention (conv mode, fused qkv, no class token, decomposed
    relative position bias on the unscaled q, residual pooling) on (B, N, C)."""
    b, n, _ = x.shape
    qkv = lin(x, w, p + "attn.qkv").reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, q_hw = pooled(qkv[0], hw, w[p + "attn.pool_q.weight"], stride_q, w, p + "attn.norm_q")
    k, k_hw = pooled(qkv[1], hw, w[p + "attn.pool_k.weight"], stride_kv, w, p + "attn.norm_k")
    v, _ = pooled(qkv[2], hw, w[p + "attn.pool_v.weight"], stride_kv, w, p + "attn.norm_v")
    d = q.shape[-1]
    scores = (q * d**-0.5) @ k.transpose(-2, -1)

    def rel(table, qn, kn):
        q_ratio, k_ratio = max(kn / qn, 1.0), max(qn / kn, 1.0)
        dist = torch.arange(qn)[:, None] * q_ratio - torch.arange(kn)[None, :] * k_ratio
        return table[(dist + (kn - 1) * k_ratio).long()]

    rh = rel(w[p + "attn.rel_pos_h"], q_hw[0], k_hw[0])
    rw = rel(w[p + "attn.rel_pos_w"], q_hw[1], k_hw[1])
    rq = q.reshape(b, heads, *q_hw, d)
    bias_h = torch.einsum("byhwc,hkc->byhwk", rq, rh)
    bias_w = torch.einsum("byhwc,wkc->byhwk", rq, rw)
    scores = scores.view(b, heads, *q_hw, *k_hw) + bias_h[..., :, None] + bias_w[..., None, :]
    out = scores.view(b, heads, q.shape[2], -1).softmax(-1) @ v + q
    out = out.transpose(1, 2).reshape(b, -1, heads * d)
    return lin(out, w, p + "attn.proj"), q_hw


# ---------------------------------------------------------------------------------------------
# Helpers


def load_into(target, conversion: Conversion):
    """Load a conversion's state dict; every trunk parameter must be filled but the reported
    missing ones, which must be exactly those left unfilled."""
    result = target.load_state_dict(conversion.state_dict, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(conversion.missing)
    return target


def tokens(x):
    """(B, C, H, W) -> (B, H * W, C)."""
    return x.flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("layer_scale", [False, True])
def test_vit_blocks_become_F_and_G(layer_scale):
    dim, depth, heads = 32, 2, 2
    w = timm_vit(dim, depth, heads, patch=8, grid=4, layer_scale=layer_scale)
    target = RevViT(
        img_size=32,
        patch_size=8,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        use_rel_pos=True,
        window_size=2,
        window_block_indexes=(0,),
        pretrain_img_size=48,  # a 6x6 grid: the source's 4x4 pos_embed is resized
        pretrain_use_cls_token=False,
    ).eval()
    conversion = convert_vit(w, target)
    assert conversion.partial_groups == ["fusion_norm", "rel_pos"]
    assert set(conversion.missing) == {"norm.weight", "norm.bias"} | {
        f"blocks.{i}.attn.rel_pos_{a}" for i in range(depth) for a in "hw"
    }
    assert set(conversion.ignored) == {"cls_token", "norm.weight", "norm.bias"} | {
        "head.weight",
        "head.bias",
    }
    assert conversion.dropped == {}
    load_into(target, conversion)

    expected_pos = F.interpolate(
        w["pos_embed"][:, 1:].reshape(1, 4, 4, dim).permute(0, 3, 1, 2),
        size=(6, 6),
        mode="bicubic",
        align_corners=False,
    )
    torch.testing.assert_close(target.pos_embed, tokens(expected_pos))

    x = torch.randn(2, 5, 5, dim, generator=torch.Generator().manual_seed(1))
    block = target.blocks[1]  # global attention; its zero relative tables add no bias
    with torch.no_grad():
        f, g = block.F(x), block.G(x)
    flat = x.reshape(2, 25, dim)
    torch.testing.assert_close(f.reshape(2, 25, dim), vit_attention_branch(flat, w, 1, heads))
    torch.testing.assert_close(g.reshape(2, 25, dim), vit_mlp_branch(flat, w, 1))


@pytest.mark.parametrize("video", [False, True])
def test_pyslowfast_revvit_reproduces_the_official_forward(video):
    dim, depth, heads, patch, grid = 32, 3, 2, 8, 4
    w = pyslowfast_revvit(dim, depth, patch, grid, video=video)
    target = RevViT(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        use_rel_pos=False,
        pretrain_img_size=grid * patch,
        pretrain_use_cls_token=True,  # a placeholder entry stands in for the class position
    ).eval()
    conversion = convert_pyslowfast_revvit(w, target)
    assert conversion.partial_groups == []
    assert set(conversion.ignored) == {"head.projection.weight", "head.projection.bias"}
    target.load_state_dict(conversion.state_dict, strict=True)

    image = torch.randn(
        2, 3, grid * patch, grid * patch, generator=torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        out = target(image)["last_feat"]
    expected = pyslowfast_revvit_forward(image, w, depth, heads, patch)
    torch.testing.assert_close(tokens(out), expected, rtol=1e-4, atol=1e-4)


def test_video_patch_kernel_becomes_its_static_clip_response():
    dim, patch, grid = 32, 8, 4
    w = pyslowfast_revvit(dim, 1, patch, grid, video=True)
    w.add("patch_embed.proj.weight", dim, 3, 2, patch, patch)  # two temporal taps, stride 2
    target = RevViT(img_size=32, patch_size=8, embed_dim=dim, depth=1, num_heads=2)
    conversion = convert_pyslowfast_revvit(w, target)
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    clip = torch.stack([image, image], dim=2)
    expected = F.conv3d(clip, w["patch_embed.proj.weight"], stride=(2, patch, patch))[:, :, 0]
    converted = conversion.state_dict["patch_embed.proj.weight"]
    torch.testing.assert_close(F.conv2d(image, converted, stride=patch), expected)
    assert any("patch_embed.proj" in note and "summed" in note for note in conversion.notes)


def test_mmpretrain_revvit_reproduces_its_forward():
    dim, depth, heads, patch, grid = 32, 3, 2, 8, 4
    w = mmpretrain_revvit(dim, depth, patch, grid)
    target = RevViT(
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        use_rel_pos=False,
        pretrain_img_size=grid * patch,
        pretrain_use_cls_token=False,
    ).eval()
    conversion = convert_mmpretrain_revvit(w, target)
    assert conversion.partial_groups == []
    assert set(conversion.ignored) == {"backbone.cls_token", "head.fc.weight", "head.fc.bias"}
    target.load_state_dict(conversion.state_dict, strict=True)
    image = torch.randn(
        2, 3, grid * patch, grid * patch, generator=torch.Generator().manual_seed(3)
    )
    with torch.no_grad():
        out = target(image)["last_feat"]
    expected = mmpretrain_revvit_forward(image, w, depth, heads, patch)
    torch.testing.assert_close(tokens(out), expected, rtol=1e-4, atol=1e-4)


def small_rev_mvit(**kwargs):
    """A RevMViT with transitions at blocks 1, 2 and 4, global attention everywhere."""
    args = dict(
        img_size=32,
        embed_dim=8,
        depth=5,
        num_heads=1,
        last_block_indexes=(0, 1, 3, 4),
        adaptive_kv_stride=2,
        adaptive_window_size=0,
    )
    args.update(kwargs)
    return RevMViT(**args).eval()


def paper_rev_mvit(**kwargs):
    """A small RevMViT in the paper layout, configured as the official Rev-MViT."""
    return small_rev_mvit(
        layout="paper", pretrain_img_size=32, **{**REVMVIT_PAPER_OPTIONS, **kwargs}
    )


def test_pyslowfast_revmvit_is_the_official_function_in_the_paper_layout():
    """Every official weight has a place, and the converted trunk's scale5 is the official
    model's final normalised map (float64), with the official key/value strides (2, then 1
    after the first transition: the official rule, not the target's strides)."""
    # Every transition followed by a reversible block, as in the official model (whose code
    # cannot chain two transitions).
    transitions, depth = (1, 3, 5), 7
    w = pyslowfast_revmvit(dim=8, heads=1, depth=depth, transitions=transitions, grid=8)
    target = paper_rev_mvit(depth=depth, last_block_indexes=(0, 2, 4, 6))
    conversion = convert_pyslowfast_revmvit(w, target)
    assert conversion.partial_groups == [] and not conversion.differences
    assert set(conversion.dropped) == set()
    assert set(conversion.missing.values()) == {"output_norms"}  # scale2..4: added outputs
    assert {k for k in conversion.ignored} == {"head.projection.weight", "head.projection.bias"}
    load_into(target, conversion)
    target.double()
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)).double()
    with torch.no_grad():
        out = target(image)["scale5"]
    expected = pyslowfast_revmvit_forward(
        image, {k: v.double() for k, v in w.items()}, depth, transitions, heads=1, kv_stride=2
    )
    torch.testing.assert_close(tokens(out), expected, rtol=1e-10, atol=1e-10)


def test_pyslowfast_revmvit_into_the_mvitv2_layout_reports_what_differs():
    w = pyslowfast_revmvit(dim=8, heads=1, depth=5, transitions=(1, 2, 4), grid=8)
    target = small_rev_mvit(
        use_abs_pos=True, use_rel_pos=False, residual_pooling=False, pretrain_img_size=32
    )
    conversion = convert_pyslowfast_revmvit(w, target)
    assert conversion.partial_groups == ["fusion_mlp", "kv_stride", "q_pool"]
    # The MViTv2 layout doubles the key/value stride of the global last blocks of stages 3 and
    # 4 (blocks 1 and 3 here); the official model halves it at every transition and never
    # doubles it.
    assert conversion.differences == {
        "blocks.1 key/value stride 2, official 1": "kv_stride",
        "blocks.3 key/value stride 2, official 1": "kv_stride",
    }
    assert "key/value stride" in conversion.format_report()
    q_pool = {
        f"blocks.{i}.attn.{k}"
        for i in (0, 3)
        for k in ("pool_q.weight", "norm_q.weight", "norm_q.bias")
    }
    stage_norms = {f"scale{s}_norm.{p}" for s in (2, 3, 4) for p in ("weight", "bias")}
    assert set(conversion.missing) == q_pool | stage_norms
    assert set(conversion.dropped) == {k for k in w if ".pre_q_fuse." in k}
    load_into(target, conversion)
    # The class-token placeholder the RevMViT's pos_embed reserves (yacs default) stays unused.
    torch.testing.assert_close(target.pos_embed[:, 1:], w["pos_embed"])
    torch.testing.assert_close(target.scale5_norm.weight, w["norm.weight"])

    gen = torch.Generator().manual_seed(4)
    for i, hw in ((1, (8, 8)), (2, (4, 4)), (4, (2, 2))):  # transitions: F on 2C inputs
        block, p = target.blocks[i], f"rev_backbone.layers.{i}.F."
        x = torch.randn(2, *hw, block.norm1.normalized_shape[0], generator=gen)
        with torch.no_grad():
            out = block.attn(block.norm1(x))
        expected, q_hw = pyslowfast_attention(
            ln(x.flatten(1, 2), w, p + "norm"),
            hw,
            w,
            p,
            block.attn.num_heads,
            block.attn.pool_q.stride[0],
            block.attn.pool_k.stride[0],
        )
        assert tuple(out.shape[1:3]) == q_hw
        torch.testing.assert_close(out.flatten(1, 2), expected, rtol=1e-4, atol=1e-5)
    for i in range(5):  # every G, reversible or transition
        block, p = target.blocks[i], f"rev_backbone.layers.{i}.G."
        x = torch.randn(2, 3, 3, block.norm2.normalized_shape[0], generator=gen)
        with torch.no_grad():
            out = block.mlp(block.norm2(x))
        torch.testing.assert_close(out, mlp(ln(x, w, p + "norm"), w, p + "mlp.fc1", p + "mlp.fc2"))


def test_mvitv2_stage_preserving_blocks_match():
    w = mvitv2(dim=8, heads=1, depth=5, transitions=(1, 2, 4), grid=8, kv_stride=2)
    target = small_rev_mvit(use_rel_pos=True, residual_pooling=True)
    conversion = convert_mvitv2(w, target)
    assert conversion.partial_groups == ["skip_proj", "stage_norms", "transition"]
    transition = {
        f"blocks.{i}.{k}.{p}"
        for i in (1, 2, 4)
        for k in ("norm1", "attn.qkv")
        for p in ("weight", "bias")
    }
    stage_norms = {f"scale{s}_norm.{p}" for s in (2, 3, 4, 5) for p in ("weight", "bias")}
    assert set(conversion.missing) == transition | stage_norms
    assert {k for k, g in conversion.dropped.items() if g == "transition"} == transition
    assert {k for k, g in conversion.dropped.items() if g == "skip_proj"} == {
        f"blocks.{i}.proj.{p}" for i in (1, 2, 4) for p in ("weight", "bias")
    }
    assert set(conversion.ignored) == {"cls_token", "norm.weight", "norm.bias"} | {
        "head.projection.weight",
        "head.projection.bias",
    }
    load_into(target, conversion)

    gen = torch.Generator().manual_seed(5)
    for i, hw in ((0, (8, 8)), (3, (2, 2))):  # stage-preserving: F and G are MViTv2's branches
        block, p = target.blocks[i], f"blocks.{i}."
        x = torch.randn(2, *hw, block.norm1.normalized_shape[0], generator=gen)
        with torch.no_grad():
            f, g = block.F(x), block.G(x)
        expected, _ = mvitv2_attention(
            ln(x.flatten(1, 2), w, p + "norm1"),
            hw,
            w,
            p,
            block.attn.num_heads,
            block.attn.pool_q.stride[0],
            block.attn.pool_k.stride[0],
        )
        torch.testing.assert_close(f.flatten(1, 2), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g, mlp(ln(x, w, p + "norm2"), w, p + "mlp.fc1", p + "mlp.fc2"))
    # Transition 1 pools keys twice as much in rev_det (global last block of stage 3, as in
    # Detectron2's MViT): its table is interpolated to the target's length.
    source, resized = w["blocks.1.attn.rel_pos_h"], target.blocks[1].attn.rel_pos_h
    assert source.shape[0] != resized.shape[0]
    expected = F.interpolate(source.t()[None], size=resized.shape[0], mode="linear")[0].t()
    torch.testing.assert_close(resized, expected)
    assert any("relative position tables resized" in note for note in conversion.notes)


def test_shape_mismatch_names_key_and_shapes():
    w = timm_vit(dim=48, depth=2, heads=2, patch=8, grid=4)
    target = RevViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(ConversionError) as info:
        convert_vit(w, target)
    message = str(info.value)
    assert "blocks.0.attn.qkv.weight: target shape (96, 32)" in message
    assert "from source blocks.0.attn.qkv.weight: (144, 48)" in message
    assert "EMBED_DIM" in message


def test_layout_errors_say_what_to_change():
    vit = timm_vit(dim=32, depth=3, heads=2, patch=8, grid=4)
    with pytest.raises(ConversionError, match="DEPTH to 3"):
        convert_vit(vit, RevViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(ConversionError, match="RevMViT"):
        convert_mvitv2(vit, RevViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2))
    with pytest.raises(ConversionError, match="is --source right"):
        convert_pyslowfast_revvit(
            vit, RevViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2)
        )
    w = mvitv2(dim=8, heads=1, depth=5, transitions=(1, 2, 4), grid=8, kv_stride=2)
    with pytest.raises(ConversionError, match=r"LAST_BLOCK_INDEXES to \[0, 1, 3, 4\]"):
        convert_mvitv2(w, small_rev_mvit(last_block_indexes=(0, 2, 3, 4)))


def test_unknown_source_keys_are_reported_not_lost():
    w = timm_vit(dim=32, depth=2, heads=2, patch=8, grid=4)
    w.add("blocks.0.attn.q_norm.weight", 16)  # timm qk_norm: rev_det has no such layer
    target = RevViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    conversion = convert_vit(w, target)
    assert conversion.dropped == {"blocks.0.attn.q_norm.weight": "unrecognised"}
    assert conversion.blocking_groups(["fusion_norm"]) == ["unrecognised"]
    assert conversion.blocking_groups(["all"]) == []
    report = conversion.format_report()
    assert "[unrecognised]" in report and "blocks.{0}.attn.q_norm.weight" in report


def test_checkpoint_containers_and_output_names(tmp_path):
    sd = {"a": torch.zeros(1)}
    assert extract_state_dict({"model_state": sd, "epoch": 3, "cfg": "MVIT: ..."}) == sd
    assert extract_state_dict({"state_dict": sd, "meta": {"epoch": 3}}) == sd
    assert extract_state_dict({"model": sd}) == sd
    assert extract_state_dict(sd) == sd
    with pytest.raises(ConversionError, match="no tensors"):
        extract_state_dict({"epoch": 3})
    conversion = Conversion("vit", "RevViT", sd, {"a": "a"}, {}, {}, {})
    with pytest.raises(ConversionError, match="pycls"):
        save_detectron2_checkpoint(conversion, "backbone.net.", str(tmp_path / "x.pyth"))


def test_trunk_prefix_follows_the_built_model():
    trunk, prefix = build_target_trunk(DEMO_YAML)
    assert isinstance(trunk, RevViT) and prefix == "backbone.net."
    assert trunk.pos_embed.device.type == "meta"
    lazy_trunk, lazy_prefix = build_target_trunk(DEMO_PY)
    assert lazy_prefix == prefix
    assert {k: v.shape for k, v in lazy_trunk.state_dict().items()} == {
        k: v.shape for k, v in trunk.state_dict().items()
    }
    mvit, mvit_prefix = build_target_trunk(DEMO_MVIT_YAML, ["MODEL.REV.PYRAMID", "fpn"])
    assert isinstance(mvit, RevMViT) and mvit_prefix == "backbone.bottom_up."


def load_tool():
    return load_script("tools", "convert_pretrained")


def demo_vit_checkpoint(path):
    """A timm ViT of the demo's trunk size (192 wide, 6 blocks, 3 heads) at 224: a 14x14 grid."""
    torch.save({"model": dict(timm_vit(dim=192, depth=6, heads=3, patch=16, grid=14))}, path)


def test_cli_refuses_partial_conversions(tmp_path):
    source, output = tmp_path / "mae.pth", tmp_path / "out.pth"
    demo_vit_checkpoint(source)
    args = ["--source", "vit", "--input", str(source), "--output", str(output)]
    run = subprocess.run(
        [sys.executable, TOOL, *args, "--config-file", DEMO_YAML, "--allow-partial", "rel_pos"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 1, run.stderr
    # The demo trunk's convolutional stem replaces the ViT's patch projection.
    assert (
        "[conv_stem]" in run.stdout and "[fusion_norm]" in run.stdout and "[rel_pos]" in run.stdout
    )
    assert "PARTIAL: groups conv_stem, fusion_norm" in run.stdout and "initialisation" in run.stdout
    assert "pos_embed resized (bicubic) from the source's 14x14" in run.stdout
    assert not output.exists()


@pytest.mark.parametrize("config", [DEMO_YAML, DEMO_PY])
def test_cli_output_loads_with_detection_checkpointer(tmp_path, config):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, get_cfg, instantiate
    from detectron2.modeling import build_model

    import rev_det

    main = load_tool().main

    source, output = tmp_path / "mae.pth", tmp_path / "out.pth"
    demo_vit_checkpoint(source)
    args = ["--source", "vit", "--input", str(source), "--output", str(output)]
    assert (
        main([*args, "--config-file", config, "--allow-partial", "conv_stem,fusion_norm,rel_pos"])
        == 0
    )

    if config.endswith(".py"):
        model = instantiate(LazyConfig.load(config).model)
    else:
        cfg = get_cfg()
        rev_det.add_revdet_config(cfg)
        cfg.merge_from_file(config)
        model = build_model(cfg)
    trunk = model.backbone.net
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    DetectionCheckpointer(model).load(str(output))
    converted = convert_vit(timm_vit(dim=192, depth=6, heads=3, patch=16, grid=14), trunk)
    for key, value in trunk.state_dict().items():
        if key in converted.missing:  # left at initialisation
            # but for frozen batch-norm statistics: Detectron2's FrozenBatchNorm2d starts
            # running_var at 1 - eps and fills one a checkpoint lacks with 1.
            tol = 1e-4 if key.endswith(("running_mean", "running_var")) else 0.0
            assert torch.allclose(value, before[key], rtol=0.0, atol=tol), key
        else:
            assert torch.equal(value, converted.state_dict[key]), key
    loaded = torch.load(output)
    assert loaded["__author__"] == "rev_det convert_pretrained (source vit)"
    assert loaded["matching_heuristics"] is False


def test_vit_with_a_stem_and_relative_positions_converts_whole_but_the_fusion_norm():
    """A plain ViT of RevViTDet's layout with a convolutional stem and ViTDet's relative position
    tables (the demo's pretrained plain trunk): every weight has its place in a RevViT of that
    shape; only RevViT's fusion norm is new."""
    from rev_det.modeling import RevViTDet

    shape = dict(img_size=64, embed_dim=32, depth=2, num_heads=2, use_rel_pos=True)
    shape.update(window_size=2, window_block_indexes=(0,), stem_channels=(8, 16))
    torch.manual_seed(0)
    source = RevViTDet(**shape).state_dict()
    target = RevViT(**shape).eval()
    conversion = convert_vit(source, target)
    assert conversion.partial_groups == ["fusion_norm"]
    assert set(conversion.missing) == {"norm.weight", "norm.bias"}
    state = target.state_dict()
    for key, value in conversion.state_dict.items():
        want = source[key][:, 1:] if key == "pos_embed" else source[key]  # the class token's
        got = value[:, 1:] if key == "pos_embed" else value  # entry is unused by both
        assert torch.equal(got, want) and value.shape == state[key].shape, key
    assert any(key.startswith("patch_embed.stem.") for key in conversion.state_dict)


@pytest.mark.parametrize(
    "name", ["mask_rcnn_rev_mvit_b_paper.yaml", "mask_rcnn_rev_mvit_b_paper_36ep.py"]
)
def test_official_rev_mvit_b_converts_completely_for_the_paper_configs(tmp_path, name, capsys):
    """A checkpoint with the shapes of the released REV_MVIT_B.pyth (96 wide, 16 blocks,
    transitions at 1, 3 and 14, a 56x56 position grid) converts with no partial group for the
    paper's detection configs: the tool writes it without --allow-partial."""
    source, output = tmp_path / "REV_MVIT_B.pyth", tmp_path / "out.pth"
    w = pyslowfast_revmvit(dim=96, heads=1, depth=16, transitions=(1, 3, 14), grid=56)
    torch.save({"model_state": dict(w)}, source)
    config = os.path.join(ROOT, "configs", "COCO", name)
    args = ["--source", "pyslowfast-revmvit", "--input", str(source), "--output", str(output)]
    assert load_tool().main([*args, "--config-file", config]) == 0
    report = capsys.readouterr().out
    assert "[output_norms]" in report and "PARTIAL" not in report
    saved = torch.load(output)["model"]
    (fuse,) = [v for k, v in saved.items() if k.endswith(".blocks.14.fuse.fc1.weight")]
    assert torch.equal(fuse, w["rev_backbone.layers.14.pre_q_fuse.fuse_fn.fc1.weight"])
