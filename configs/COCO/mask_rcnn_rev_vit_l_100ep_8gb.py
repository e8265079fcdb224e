"""RevViT-L Mask R-CNN at 1024 in 8 GB per GPU (the yacs twin: mask_rcnn_rev_vit_l_8gb.yaml):
the optimizer step inside backward, recomputed heads, bfloat16 autocast."""

from .mask_rcnn_rev_vit_l_100ep import dataloader, lr_multiplier, model, optimizer, train

train.step_in_backward = True
train.recompute_heads = True
train.amp.precision = "bfloat16"  # float16's GradScaler cannot combine with the step in backward
train.output_dir = "output/mask_rcnn_rev_vit_l_100ep_8gb"
