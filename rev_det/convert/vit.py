"""``vit``: a plain ViT in timm's layout (MAE, DeiT, timm), as an initialisation of a RevViT.

Layout (``model`` or raw state dict): ``cls_token``, ``pos_embed`` (1, prefix tokens + HW, C),
``patch_embed.proj``, ``blocks.{i}.norm1``, ``.attn.qkv`` (fused), ``.attn.proj``, ``.norm2``,
``.mlp.fc1/fc2``, optional layer scale ``.ls1.gamma`` / ``.ls2.gamma`` (folded into
``attn.proj`` and ``mlp.fc2``), ``norm`` / ``fc_norm`` and ``head``. A ViT block ``x + A(x)``,
``x + M(x)`` gives its attention branch A to F and its MLP branch M to G: the reversible model
is a different function (an initialisation, as in Re2TAL / Dr2Net).
"""

from typing import Mapping

import torch

from ..modeling.rev_vit import RevViT
from .core import (
    BRANCH_KEYS,
    Conversion,
    KeyMapping,
    block_indexes,
    check_depth,
    check_target,
    pos_grid,
    strip_prefix,
)

__all__ = ["convert_vit"]

# All of a ViT block's parameters.
_VIT_BLOCK_KEYS = tuple(f"{m}.{p}" for m in ("norm1", "attn.qkv") for p in ("weight", "bias"))
_VIT_BLOCK_KEYS += BRANCH_KEYS
# A ViTDet-trained ViT's relative position tables (MAE, DeiT and timm ViTs have none).
_REL_POS_KEYS = ("attn.rel_pos_h", "attn.rel_pos_w")


def convert_vit(sd: Mapping[str, torch.Tensor], target: RevViT) -> Conversion:
    """A plain ViT in timm's layout (MAE, DeiT, timm) into a :class:`RevViT`, as an
    initialisation: block ``i``'s attention branch becomes ``F`` and its MLP branch ``G``
    (layer scale folded into their output projections); the 2C fusion LayerNorm has no
    counterpart ("fusion_norm")."""
    source = "vit"
    check_target(target, RevViT, source)
    sd = strip_prefix(sd, "module.")
    m = KeyMapping(source, sd)
    indexes = block_indexes(sd, "blocks.")
    check_depth(source, indexes, "blocks.", target)
    m.copy("patch_embed.proj.weight", "patch_embed.proj.weight")
    m.copy("patch_embed.proj.bias", "patch_embed.proj.bias")
    # A convolutional stem before the projection (rev_det's PatchEmbed: RevViTDet's demo
    # trunk) has the same names in RevViT.
    for key in sorted(k for k in sd if k.startswith("patch_embed.stem.")):
        m.copy(key, key)
    if "pos_embed" in sd:
        m.put("pos_embed", pos_grid(sd["pos_embed"]), ["pos_embed"])
    folded = 0
    for i in indexes:
        t = f"blocks.{i}."
        for key in _VIT_BLOCK_KEYS + _REL_POS_KEYS:
            m.copy(t + key, t + key)
        for scale, out in (("ls1.gamma", "attn.proj"), ("ls2.gamma", "mlp.fc2")):
            if t + scale not in sd:
                continue
            # x + gamma * (W h + b) == x + (gamma W) h + gamma b: exact.
            gamma = sd[t + scale]
            for p in ("weight", "bias"):
                key = f"{t}{out}.{p}"
                if key in sd:
                    value = sd[key] * (gamma[:, None] if p == "weight" else gamma)
                    m.put(key, value, [key, t + scale])
            folded += 1
    if folded:
        m.notes.append(f"layer scale folded into attn.proj / mlp.fc2 ({folded} branches)")
    m.ignore(r"(cls_token|dist_token|reg_token)", "class / distillation / register token")
    m.ignore(r"(norm|fc_norm|head|head_dist|pre_logits|attn_pool)\..*", "classifier and its norm")
    m.ignore(r"mask_token|decoder_.*", "MAE decoder")
    m.ignore(r"blocks\.\d+\.coupling\.(alpha|beta)", "RevViTDet's coupling coefficients")
    m.drop(r"norm_pre\..*", "stem_norm")
    m.notes.append(
        "a ViT block is not a reversible block: F and G receive its attention and MLP "
        "branches, so the converted trunk is an initialisation, not the ViT"
    )
    return m.finish(target)
