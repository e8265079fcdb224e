"""ViTDet's ``mask_rcnn_vitdet_b_100ep.py`` with its ViT-B replaced by RevViTDet, the reversible
surrogate of the same ViT (docs/vitdet_surrogate.md): the same parameter names, pyramid, heads,
LSJ data at 1024, AdamW with layer-wise lr decay 0.7 and 100-epoch schedule, from the same MAE
weights. Runs on Detectron2 v0.6 (which ships no ViTDet) and on main.

The coupling schedule (``train.coupling``) starts at ViT's function, ``(alpha, beta) = (1, 0)``,
and reaches RevViT's coupling ``(0, 1)`` at 10% of the run; the trunk back-propagates with
"checkpoint" until then and "reversible" after. To continue ViTDet's own COCO detector instead,
set ``train.init_checkpoint`` to its ``model_final_*.pkl``.
"""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from rev_det.modeling import REVVIT_SIZES, RevViTDet, SimpleFeaturePyramid

from .mask_rcnn_rev_vit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone = L(SimpleFeaturePyramid)(
    net=L(RevViTDet)(
        **REVVIT_SIZES["B"],  # ViTDet's ViT-B: width, depth, heads, drop path, window blocks
        img_size=1024,
        patch_size=16,
        window_size=14,
        mlp_ratio=4,
        qkv_bias=True,
        use_rel_pos=True,
        backprop="reversible",
        out_feature="last_feat",
    ),
    in_feature="last_feat",
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=1024,
    recompute=True,  # its levels recomputed in backward with the trunk (ViTDet stores them)
)

train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_base.pth?matching_heuristics=True"
)
train.coupling = dict(alpha=(1.0, 0.0), beta=(0.0, 1.0), ramp=(0.0, 0.1))
train.output_dir = "output/mask_rcnn_rev_vitdet_b_100ep"
