"""``mvitv2``: MViTv2 in facebookresearch/mvit's layout, as an initialisation of a RevMViT.

Layout (shared by Detectron2's ``MViT``; ``.pyth`` ImageNet files with ``model_state``):
``patch_embed.proj`` (Conv2d), ``cls_token`` and ``pos_embed`` if enabled (off in the released
models), ``blocks.{i}.norm1``, ``.attn.qkv``, ``.attn.proj``, ``.attn.pool_{q,k,v}`` (Conv2d
(d, 1, 3, 3)), ``.attn.norm_{q,k,v}``, ``.attn.rel_pos_h/w``, ``.norm2``, ``.mlp.fc1/fc2``, and
in the first block of each stage (channel doubling in attention) ``.proj`` (the skip
projection, C to 2C); ``norm`` and ``head.projection``. Stage-preserving blocks have rev_det's
names and shapes; rev_det's transitions take the 2C concatenated streams, so their ``norm1``
and ``attn.qkv`` cannot come from MViTv2 (group "transition").
"""

import re
from typing import Mapping

import torch

from ..modeling.rev_mvit import RevMViT
from .core import (
    BRANCH_KEYS,
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
)

__all__ = ["convert_mvitv2"]


def convert_mvitv2(sd: Mapping[str, torch.Tensor], target: RevMViT) -> Conversion:
    """MViTv2 (facebookresearch/mvit, Detectron2's ImageNet ``.pyth`` files) into a
    :class:`RevMViT`, as an initialisation: stage-preserving blocks copy over with the same
    semantics (``F`` = norm1 + attention, ``G`` = norm2 + MLP); transitions keep everything but
    their inputs ("transition") and skip projection ("skip_proj")."""
    source = "mvitv2"
    check_target(target, RevMViT, source)
    sd = strip_prefix(sd, "module.")
    m = KeyMapping(source, sd)
    indexes = block_indexes(sd, "blocks.")
    check_depth(source, indexes, "blocks.", target)
    found = [i for i in indexes if f"blocks.{i}.proj.weight" in sd]
    for i in found:
        if sd[f"blocks.{i}.norm1.weight"].shape == sd[f"blocks.{i}.norm2.weight"].shape:
            raise ConversionError(
                f"block {i} changes width in its MLP (MViTv1 layout, DIM_MUL_IN_ATT False); "
                "rev_det's RevMViT follows MViTv2, where the attention changes it."
            )
    check_transitions(source, found, target)
    m.copy("patch_embed.proj.weight", "patch_embed.proj.weight", m.conv2d("patch_embed.proj"))
    m.copy("patch_embed.proj.bias", "patch_embed.proj.bias")
    if "pos_embed" in sd:
        m.put("pos_embed", pos_grid(sd["pos_embed"]), ["pos_embed"])
    m.ignore("cls_token", "class token (rev_det has none)")
    for i in indexes:
        t = f"blocks.{i}."
        if i in found:
            m.drop(re.escape(t) + r"(norm1|attn\.qkv|attn\.[qkv])\..*", "transition")
            m.drop(re.escape(t) + r"proj\..*", "skip_proj")
        else:
            for p in ("weight", "bias"):
                m.copy(f"{t}norm1.{p}", f"{t}norm1.{p}")
            copy_qkv(m, f"{t}attn.", f"{t}attn.")
        for key in BRANCH_KEYS:
            m.copy(t + key, t + key)
        for key in POOL_KEYS:
            m.copy(t + key, t + key, m.conv2d(t + key))
        for axis in "hw":
            m.copy(f"{t}attn.rel_pos_{axis}", f"{t}attn.rel_pos_{axis}")
    m.ignore(r"(norm|head)\..*", "classifier and its norm")
    m.drop(r"scale\d_norm\..*", "stage_norms")
    m.notes.append(
        "MViTv2 blocks are not reversible blocks: F and G receive their attention and MLP "
        "branches, so the converted trunk is an initialisation, not MViTv2"
    )
    return m.finish(target)
