"""ViTDet's ``cascade_mask_rcnn_vitdet_b_100ep.py`` with RevViTDet: the Mask R-CNN config's
backbone and recipe with ViTDet's three-stage cascade box heads."""

from ..common.cascade import cascade_roi_heads
from .mask_rcnn_rev_vitdet_b_100ep import dataloader, lr_multiplier, model, optimizer, train

cascade_roi_heads(model)
train.output_dir = "output/cascade_mask_rcnn_rev_vitdet_b_100ep"
