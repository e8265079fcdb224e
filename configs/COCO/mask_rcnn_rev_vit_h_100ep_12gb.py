"""RevViT-H Mask R-CNN at 1024 in 12 GB per GPU (the yacs twin: mask_rcnn_rev_vit_h_12gb.yaml):
the optimizer step inside backward, recomputed heads, bfloat16 autocast."""

from .mask_rcnn_rev_vit_h_100ep import dataloader, lr_multiplier, model, optimizer, train

train.step_in_backward = True
train.recompute_heads = True
train.amp.precision = "bfloat16"  # float16's GradScaler cannot combine with the step in backward
train.output_dir = "output/mask_rcnn_rev_vit_h_100ep_12gb"
