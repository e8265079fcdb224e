"""ViTDet's ``mask_rcnn_vitdet_l_100ep.py`` with RevViTDet-L (derived from the B config)."""

from rev_det.modeling import REVVIT_SIZES

from .mask_rcnn_rev_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(REVVIT_SIZES["L"])  # ViTDet's ViT-L

optimizer.params.lr_decay_rate = 0.8
optimizer.params.num_layers = REVVIT_SIZES["L"]["depth"]
train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_large.pth?matching_heuristics=True"
)
train.output_dir = "output/mask_rcnn_rev_vitdet_l_100ep"
