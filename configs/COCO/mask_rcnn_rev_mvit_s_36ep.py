"""RevMViT-S Mask R-CNN on COCO (MViTv2 recipe), derived from the T config."""

from rev_det.modeling import REVMVIT_SIZES

from .mask_rcnn_rev_mvit_t_36ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.update(REVMVIT_SIZES["S"])  # MViTv2-S
train.output_dir = "output/mask_rcnn_rev_mvit_s_36ep"
