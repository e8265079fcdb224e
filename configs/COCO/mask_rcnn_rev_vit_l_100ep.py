"""RevViT-L Mask R-CNN on COCO (ViTDet recipe), derived from the B config."""

from rev_det.modeling import REVVIT_SIZES

from .mask_rcnn_rev_vit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(REVVIT_SIZES["L"])  # ViTDet's ViT-L

optimizer.params.lr_decay_rate = 0.8
optimizer.params.num_layers = REVVIT_SIZES["L"]["depth"]
train.output_dir = "output/mask_rcnn_rev_vit_l_100ep"
