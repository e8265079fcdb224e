"""RevViT-B Mask R-CNN on COCO, ViTDet's recipe: LSJ at 1024, AdamW with layer-wise lr decay,
100 epochs at batch 64. Train with projects/lazyconfig_train_net.py."""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from rev_det.modeling import REVVIT_SIZES, ReversibleFeaturePyramid, RevViT

from ..common.data import dataloader
from ..common.mask_rcnn import model
from ..common.optim import lr_multiplier, optimizer

model.backbone = L(ReversibleFeaturePyramid)(
    net=L(RevViT)(
        **REVVIT_SIZES["B"],  # ViTDet's ViT-B: width, depth, heads, drop path, window blocks
        img_size=1024,
        patch_size=16,
        window_size=14,
        use_abs_pos=True,
        use_rel_pos=True,
        pretrain_img_size=224,
        backprop="reversible",
    ),
    out_channels=256,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=1024,
)

dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=1024, target_width=1024),
    L(T.FixedSizeCrop)(crop_size=(1024, 1024), pad=False),
]
dataloader.train.mapper.recompute_boxes = True  # boxes from masks after cropping
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=1024, max_size=1024)
]

train = model_zoo.get_config("common/train.py").train
train.max_iter = 184375  # 100 epochs of train2017 at batch 64
train.amp.enabled = True
train.ddp.fp16_compression = True
train.init_checkpoint = ""  # e.g. MAE ViT-B converted by tools/convert_pretrained.py
train.output_dir = "output/mask_rcnn_rev_vit_b_100ep"

optimizer.lr = 1e-4
optimizer.weight_decay = 0.1
optimizer.params.lr_decay_rate = 0.7
optimizer.params.num_layers = REVVIT_SIZES["B"]["depth"]
lr_multiplier.scheduler.milestones = [163889, 177546]  # 88.9% and 96.3%
lr_multiplier.warmup_length = 250 / train.max_iter
