"""ViTDet's ``mask_rcnn_vitdet_h_75ep.py`` with RevViTDet-H (derived from the B config): 75
epochs, lr decay 0.9, and, as ViTDet's H recipe, weight decay on the norms too."""

from rev_det.modeling import REVVIT_SIZES

from .mask_rcnn_rev_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(REVVIT_SIZES["H"])  # ViTDet's ViT-H

optimizer.params.lr_decay_rate = 0.9
optimizer.params.num_layers = REVVIT_SIZES["H"]["depth"]
optimizer.params.weight_decay_norm = "${..weight_decay}"
train.init_checkpoint = (
    "detectron2://ImageNetPretrained/MAE/mae_pretrain_vit_huge_p14to16.pth?matching_heuristics=True"
)
train.max_iter = train.max_iter * 3 // 4  # 100 epochs -> 75
lr_multiplier.scheduler.milestones = [m * 3 // 4 for m in lr_multiplier.scheduler.milestones]
lr_multiplier.warmup_length = 250 / train.max_iter
train.output_dir = "output/mask_rcnn_rev_vitdet_h_75ep"
