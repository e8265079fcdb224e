"""RevMViT-B Mask R-CNN on COCO (MViTv2 recipe), derived from the T config."""

from .mask_rcnn_rev_mvit_t_36ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.depth = 24
model.backbone.net.last_block_indexes = (1, 4, 20, 23)
model.backbone.net.drop_path_rate = 0.4
train.output_dir = "output/mask_rcnn_rev_mvit_b_36ep"
