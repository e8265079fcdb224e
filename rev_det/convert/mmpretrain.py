"""``mmpretrain-revvit``: mmpretrain's ``RevVisionTransformer``.

Layout (``backbone.`` prefix in a classifier's ``state_dict``): ``patch_embed.projection``,
``cls_token`` (unused), ``pos_embed`` (1, 1 + HW, C; the class entry is dropped in its
forward), ``layers.{i}.ln1``, ``.attn.qkv``, ``.attn.proj``, ``.ln2``, ``.ffn.layers.0.0``
(fc1), ``.ffn.layers.1`` (fc2), the same coupling as PySlowFast, and ``ln1`` over the 2C
concatenation.
"""

import re
from typing import Mapping

import torch

from ..modeling.rev_vit import RevViT
from .core import (
    Conversion,
    KeyMapping,
    block_indexes,
    check_depth,
    check_target,
    pos_grid,
    strip_prefix,
)

__all__ = ["convert_mmpretrain_revvit"]


def convert_mmpretrain_revvit(sd: Mapping[str, torch.Tensor], target: RevViT) -> Conversion:
    """mmpretrain's ``RevVisionTransformer`` into a :class:`RevViT` (every trunk parameter has a
    counterpart with the same semantics)."""
    source = "mmpretrain-revvit"
    check_target(target, RevViT, source)
    sd = strip_prefix(sd, "module.")
    m = KeyMapping(source, sd)
    # A classifier's checkpoint nests the backbone under "backbone."; keys keep their file names.
    prefix = "backbone." if any(k.startswith("backbone.") for k in sd) else ""
    if prefix:
        m.ignore(r"(head|neck|data_preprocessor)\..*", "classifier head")
    inner = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    indexes = block_indexes(inner, "layers.")
    check_depth(source, indexes, prefix + "layers.", target)

    def copy(target_key: str, key: str, fn=None):
        m.copy(target_key, prefix + key, fn)

    copy("patch_embed.proj.weight", "patch_embed.projection.weight")
    copy("patch_embed.proj.bias", "patch_embed.projection.bias")
    if "pos_embed" in inner:
        m.put("pos_embed", pos_grid(inner["pos_embed"]), [prefix + "pos_embed"])
    m.ignore(re.escape(prefix) + "cls_token", "class token (unused by RevVisionTransformer)")
    names = {"ln1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "ln2": "norm2"}
    names.update({"ffn.layers.0.0": "mlp.fc1", "ffn.layers.1": "mlp.fc2"})
    for i in indexes:
        for src, dst in names.items():
            for p in ("weight", "bias"):
                copy(f"blocks.{i}.{dst}.{p}", f"layers.{i}.{src}.{p}")
    for p in ("weight", "bias"):
        copy(f"norm.{p}", f"ln1.{p}")
    m.drop(re.escape(prefix) + r"patch_embed\.norm\..*", "stem_norm")
    return m.finish(target)
