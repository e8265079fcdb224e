"""``pyslowfast-revvit`` / ``pyslowfast-revmvit``: the paper's official Rev-ViT and Rev-MViT.

Layout (PySlowFast ``slowfast/models/reversible_mvit.py``, built by the ``MViT`` class of
``video_model_builder.py`` with ``MVIT.REV.ENABLE``; ``.pyth`` files with ``model_state``):
``patch_embed.proj`` (Conv2d, or Conv3d (C, 3, t, k, k) in video models), ``pos_embed``
(1, HW, C) without a class entry (Rev models forbid the class token), or in video models
``pos_embed_spatial`` (1, HW, C) and ``pos_embed_temporal`` (1, T, C);
``rev_backbone.layers.{i}.F.norm`` (F = LayerNorm + attention), ``.F.attn.q/k/v`` (separate
with SEPARATE_QKV, the released configs) or ``.F.attn.qkv``, ``.F.attn.proj``,
``.F.attn.pool_{q,k,v}`` (Conv3d (d, 1, t, k, k), depthwise, shared by the heads) and
``.F.attn.norm_{q,k,v}`` (only where pooled: Rev-MViT pools q in transitions only),
``.G.norm``, ``.G.mlp.fc1/fc2`` (G = LayerNorm + MLP); forward ``Y1 = X1 + F(X2)``,
``Y2 = X2 + G(Y1)`` as in rev_det. Stage-transition layers (``MVIT.REV.BUFFER_LAYERS``)
take the 2C concatenated streams (``PRE_Q_FUSION`` "concat*") and, for "concat_linear*",
first apply ``pre_q_fuse.fuse_fn`` (an MLP with a residual); their attention maps 2C to the
new width (no skip projection) and pools the skip path with its own ``pool_q``.
``norm`` is a LayerNorm over the 2C concatenation of the final streams; ``head.projection``
the classifier. Key/value strides are not in the weights: the released configs set
``POOL_KV_STRIDE_ADAPTIVE`` for the first block and halve it at every query stride
(:func:`official_kv_strides`).
"""

import re
from typing import List, Mapping

import torch
from torch import nn

from ..modeling.rev_mvit import RevMViT
from ..modeling.rev_vit import RevViT
from .core import (
    POOL_KEYS,
    Conversion,
    ConversionError,
    KeyMapping,
    block_indexes,
    check_depth,
    check_target,
    check_transitions,
    copy_qkv,
    pos_grid,
    strip_prefix,
    transition_indexes,
)

__all__ = ["convert_pyslowfast_revvit", "convert_pyslowfast_revmvit", "official_kv_strides"]


def _width(sd: Mapping[str, torch.Tensor], key: str, source: str) -> int:
    if key not in sd:
        raise ConversionError(f"the checkpoint has no {key}, which the {source} layout has.")
    return sd[key].shape[0]


def official_kv_strides(target: RevMViT) -> List[int]:
    """The key/value stride of each block of the official Rev-MViT with the target's first
    stride and transitions: halved at every transition (PySlowFast's adaptive strides), never
    doubled."""
    stride, strides = target.blocks[0].attn.pool_k.stride[0], []
    transitions = set(transition_indexes(target))
    for i in range(len(target.blocks)):
        stride = max(stride // 2, 1) if i in transitions else stride
        strides.append(stride)
    return strides


def _pyslowfast(sd: Mapping[str, torch.Tensor], target: nn.Module, source: str) -> Conversion:
    """PySlowFast's reversible MViT layout (Rev-ViT is the case without pooling) into a RevViT
    or RevMViT."""
    sd = strip_prefix(sd, "module.")
    m = KeyMapping(source, sd)
    layer = "rev_backbone.layers."
    indexes = block_indexes(sd, layer)
    check_depth(source, indexes, layer, target)
    width_f = [_width(sd, f"{layer}{i}.F.norm.weight", source) for i in indexes]
    width_g = [_width(sd, f"{layer}{i}.G.norm.weight", source) for i in indexes]
    found = [i for i in indexes[1:] if width_f[i] != width_g[i - 1] or width_g[i] != width_f[i]]
    if isinstance(target, RevMViT):
        check_transitions(source, found, target)
    elif found:
        raise ConversionError(
            f"the checkpoint changes width at blocks {found}: it is a Rev-MViT; use --source "
            "pyslowfast-revmvit with a RevMViT config."
        )
    transitions = transition_indexes(target)
    paper = isinstance(target, RevMViT) and target.layout == "paper"
    m.copy("patch_embed.proj.weight", "patch_embed.proj.weight", m.conv2d("patch_embed.proj"))
    m.copy("patch_embed.proj.bias", "patch_embed.proj.bias")
    if "pos_embed" in sd:
        m.put("pos_embed", pos_grid(sd["pos_embed"]), ["pos_embed"])
    elif "pos_embed_spatial" in sd:
        spatial, temporal = sd["pos_embed_spatial"], sd.get("pos_embed_temporal")
        keys = ["pos_embed_spatial"]
        if temporal is not None:
            # An image is one time step; the mean over the clip's steps is the closest fit.
            spatial = spatial + temporal.mean(1, keepdim=True)
            keys.append("pos_embed_temporal")
            m.notes.append(
                f"pos_embed = pos_embed_spatial + the mean of pos_embed_temporal's "
                f"{temporal.shape[1]} steps (a video model used on images)"
            )
        m.put("pos_embed", spatial, keys)
    m.ignore(r"pos_embed_class|cls_token", "class token (rev_det has none)")
    for i in indexes:
        s, t = f"{layer}{i}.", f"blocks.{i}."
        if i in transitions and width_f[i] == width_g[i - 1]:
            # Non-concatenating fusion (PRE_Q_FUSION avg/add/...): C-wide transition inputs.
            m.drop(re.escape(s) + r"F\.(norm|attn\.(q|k|v|qkv))\..*", "transition")
        else:
            for p in ("weight", "bias"):
                m.copy(f"{t}norm1.{p}", f"{s}F.norm.{p}")
            copy_qkv(m, f"{t}attn.", f"{s}F.attn.")
        for p in ("weight", "bias"):
            m.copy(f"{t}attn.proj.{p}", f"{s}F.attn.proj.{p}")
            m.copy(f"{t}norm2.{p}", f"{s}G.norm.{p}")
            m.copy(f"{t}mlp.fc1.{p}", f"{s}G.mlp.fc1.{p}")
            m.copy(f"{t}mlp.fc2.{p}", f"{s}G.mlp.fc2.{p}")
        for key in POOL_KEYS:
            m.copy(t + key, s + "F." + key, m.conv2d(s + "F." + key))
        for axis in "hw":
            m.copy(f"{t}attn.rel_pos_{axis}", f"{s}F.attn.rel_pos_{axis}")
        table = sd.get(f"{s}F.attn.rel_pos_t")
        if table is not None and table.shape[0] == 1:
            # One time step: a constant per query, which softmax cancels.
            m.ignore(re.escape(f"{s}F.attn.rel_pos_t"), "temporal position table of length 1")
        elif table is not None:
            m.drop(re.escape(f"{s}F.attn.rel_pos_t"), "temporal")
        if paper:
            for p in ("weight", "bias"):
                for fc in ("fc1", "fc2"):
                    m.copy(f"{t}fuse.{fc}.{p}", f"{s}pre_q_fuse.fuse_fn.{fc}.{p}")
        else:
            m.drop(re.escape(s) + r"pre_q_fuse\..*", "fusion_mlp")
        m.drop(re.escape(s) + r"res_proj\..*", "skip_proj")
    final = "norm" if isinstance(target, RevViT) else "scale5_norm"
    for p in ("weight", "bias"):
        m.copy(f"{final}.{p}", f"norm.{p}")
    m.drop(r"fuse\..*", "fusion_mlp")
    m.drop(r"norm_stem\..*", "stem_norm")
    m.ignore(r"head\..*", "classifier head")
    if isinstance(target, RevMViT):
        official = official_kv_strides(target)
        for i, block in enumerate(target.blocks):
            stride = block.attn.pool_k.stride[0]
            if stride != official[i]:
                m.differ(
                    f"blocks.{i} key/value stride {stride}, official {official[i]}", "kv_stride"
                )
    if isinstance(target, RevMViT) and not paper:
        m.notes.append(
            "PySlowFast pools a transition's skip path with its attention's query pooling "
            "(RES_PATH conv); rev_det's MViTv2 layout uses a 3x3 stride-2 max pooling (no "
            "weights); the paper layout (MODEL.REVMVIT.SIZE paper_b) is the official model"
        )
    return m.finish(target)


def convert_pyslowfast_revvit(sd: Mapping[str, torch.Tensor], target: RevViT) -> Conversion:
    """PySlowFast's official Rev-ViT (``REV_VIT_S/B.pyth``) into a :class:`RevViT`.

    Every trunk parameter has a counterpart, and F, G and the final 2C LayerNorm have the same
    semantics: with global attention and no relative position tables, the converted RevViT's
    ``last_feat`` is the official model's final normalised token map.
    """
    check_target(target, RevViT, "pyslowfast-revvit")
    return _pyslowfast(sd, target, "pyslowfast-revvit")


def convert_pyslowfast_revmvit(sd: Mapping[str, torch.Tensor], target: RevMViT) -> Conversion:
    """PySlowFast's official Rev-MViT (``REV_MVIT_B.pyth``) into a :class:`RevMViT`.

    Into the paper layout (``MODEL.REVMVIT.SIZE paper_b`` with absolute positions, no relative
    positions, no residual pooling, global attention: ``configs/COCO/
    mask_rcnn_rev_mvit_b_paper.yaml``) every official weight has a place and the trunk computes
    the official function: ``scale5`` is the official model's final normalised token map; the
    ``scale2``-``scale4`` output norms are added outputs ("output_norms", not partial).

    Into the MViTv2 layout (16 blocks: ``SIZE S``) it is an initialisation: the transitions'
    fusion MLP ("fusion_mlp": that layout concatenates), query pooling of stage-preserving
    blocks ("q_pool": it pools queries in every block) and the doubled key/value strides of its
    global blocks ("kv_stride") differ.
    """
    check_target(target, RevMViT, "pyslowfast-revmvit")
    return _pyslowfast(sd, target, "pyslowfast-revmvit")
