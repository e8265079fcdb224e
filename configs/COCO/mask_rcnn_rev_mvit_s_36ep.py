"""RevMViT-S Mask R-CNN on COCO (MViTv2 recipe), derived from the T config."""

from .mask_rcnn_rev_mvit_t_36ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.depth = 16
model.backbone.net.last_block_indexes = (0, 2, 13, 15)
train.output_dir = "output/mask_rcnn_rev_mvit_s_36ep"
