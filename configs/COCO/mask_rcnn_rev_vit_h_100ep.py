"""RevViT-H Mask R-CNN on COCO (ViTDet recipe), derived from the B config."""

from .mask_rcnn_rev_vit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 1280
model.backbone.net.depth = 32
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.5
# global attention in blocks 7, 15, 23, 31
model.backbone.net.window_block_indexes = [i for i in range(32) if i % 8 != 7]

optimizer.params.lr_decay_rate = 0.9
optimizer.params.num_layers = 32
train.output_dir = "output/mask_rcnn_rev_vit_h_100ep"
