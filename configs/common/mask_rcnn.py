"""Detectron2's Mask R-CNN with ViTDet's heads, for the COCO configs: a 2-conv RPN head, a
4-conv + 1-fc box head and the mask head with LayerNorm, ImageNet RGB statistics. Each config
sets ``model.backbone``."""

from detectron2 import model_zoo

from rev_det.modeling import LayerNorm2d

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
model.proposal_generator.head.conv_dims = [-1, -1]
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = LayerNorm2d
model.roi_heads.mask_head.conv_norm = LayerNorm2d
