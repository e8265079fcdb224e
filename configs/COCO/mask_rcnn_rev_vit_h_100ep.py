"""RevViT-H Mask R-CNN on COCO (ViTDet recipe), derived from the B config."""

from rev_det.modeling import REVVIT_SIZES

from .mask_rcnn_rev_vit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(REVVIT_SIZES["H"])  # ViTDet's ViT-H

optimizer.params.lr_decay_rate = 0.9
optimizer.params.num_layers = REVVIT_SIZES["H"]["depth"]
train.output_dir = "output/mask_rcnn_rev_vit_h_100ep"
