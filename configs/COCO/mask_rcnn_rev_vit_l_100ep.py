"""RevViT-L Mask R-CNN on COCO (ViTDet recipe), derived from the B config."""

from .mask_rcnn_rev_vit_b_100ep import dataloader, lr_multiplier, model, optimizer, train

model.backbone.net.embed_dim = 1024
model.backbone.net.depth = 24
model.backbone.net.num_heads = 16
model.backbone.net.drop_path_rate = 0.4
# global attention in blocks 5, 11, 17, 23
model.backbone.net.window_block_indexes = [i for i in range(24) if i % 6 != 5]

optimizer.params.lr_decay_rate = 0.8
optimizer.params.num_layers = 24
train.output_dir = "output/mask_rcnn_rev_vit_l_100ep"
