"""LazyConfig twin of mask_rcnn_rev_vit_demo.yaml: a small RevViT Mask R-CNN fine-tuned from a
pretrained trunk on the embedded shapes dataset, on CPU (projects/lazyconfig_train_net.py)."""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from rev_det.modeling import LayerNorm2d, ReversibleFeaturePyramid, RevViT

from ..common.data import dataloader
from ..common.optim import lr_multiplier, optimizer

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(ReversibleFeaturePyramid)(
    net=L(RevViT)(
        img_size=256,
        embed_dim=192,
        depth=6,
        num_heads=3,
        drop_path_rate=0.0,
        window_size=8,
        window_block_indexes=[0, 1, 3, 4],  # global attention in 2 and 5
        stem_channels=[24, 48, 96, 192],  # a convolutional stem, as in the yaml
        stem_norm="FrozenBN",
        use_abs_pos=True,
        use_rel_pos=True,
        pretrain_img_size=256,
        pretrain_use_cls_token=False,
        backprop="reversible",
    ),
    out_channels=64,
    num_blocks=1,
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
)
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
# Detectron2's common config assumes 256-channel features; follow the pyramid's width instead.
model.proposal_generator.head.in_channels = "${...backbone.out_channels}"
model.roi_heads.box_head.input_shape = L(ShapeSpec)(
    channels="${....backbone.out_channels}", height=7, width=7
)
model.roi_heads.mask_head.input_shape = L(ShapeSpec)(
    channels="${....backbone.out_channels}", height=14, width=14
)
model.proposal_generator.anchor_generator.sizes = [[16], [32], [64], [128], [256]]
model.proposal_generator.pre_nms_topk = (1000, 500)
model.proposal_generator.post_nms_topk = (300, 200)
model.proposal_generator.batch_size_per_image = 128
model.roi_heads.num_classes = 6
model.roi_heads.batch_size_per_image = 64
model.roi_heads.box_head.conv_dims = []
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape = L(ShapeSpec)(channels=256)  # the last fc
model.roi_heads.box_pooler.sampling_ratio = 2
model.roi_heads.mask_head.conv_dims = [64, 64]
model.roi_heads.mask_head.conv_norm = LayerNorm2d
model.roi_heads.mask_pooler.sampling_ratio = 2
model.roi_heads.box_predictor.test_topk_per_image = 50

dataloader.train.dataset.names = "revdet_shapes_train"
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=(192, 224, 256), sample_style="choice", max_size=352),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.instance_mask_format = "bitmask"  # the shapes dataset stores RLE
dataloader.train.total_batch_size = 4
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "revdet_shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=256, max_size=352)
]
dataloader.test.num_workers = 1

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.max_iter = 640
train.amp.enabled = False
train.seed = 42
train.checkpointer.period = 320
train.output_dir = "output/demo_lazy"
# The demo's pretrained trunk (rev_det.model_zoo checks its sha256); every trunk weight required.
train.init_checkpoint = "rev_det://demo/rev_vit_demo_trunk.pth"
train.strict_load = True

optimizer.lr = 4e-4
optimizer.weight_decay = 0.05
lr_multiplier.scheduler.milestones = [512, 597]
lr_multiplier.warmup_length = 50 / train.max_iter
