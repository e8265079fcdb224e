"""RevMViT-T Mask R-CNN on COCO, MViTv2's recipe: multi-scale 480-800 training, AdamW 1.6e-4,
36 epochs at batch 64. Train with projects/lazyconfig_train_net.py."""

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from rev_det.modeling import REVMVIT_SIZES, LayerNorm2d, RecomputedFPN, RevMViT

from ..common.data import dataloader
from ..common.mask_rcnn import model
from ..common.optim import lr_multiplier, optimizer

model.backbone = L(RecomputedFPN)(
    net=L(RevMViT)(
        **REVMVIT_SIZES["T"],  # MViTv2-T: width, depth, heads, stage ends, drop path
        img_size=224,
        residual_pooling=True,
        use_rel_pos=True,
        backprop="reversible",
    ),
    in_features=["scale2", "scale3", "scale4", "scale5"],
    out_channels=256,
    norm=LayerNorm2d,
    top_block=L(LastLevelMaxPool)(),
    backprop="${.net.backprop}",
)

dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=tuple(range(480, 801, 32)), sample_style="choice", max_size=1333
    ),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 64

train = model_zoo.get_config("common/train.py").train
train.max_iter = 66536  # 36 epochs of train2017 at batch 64
train.amp.enabled = True
train.init_checkpoint = ""  # e.g. MViTv2 ImageNet weights converted by tools/convert_pretrained.py
train.output_dir = "output/mask_rcnn_rev_mvit_t_36ep"

optimizer.lr = 1.6e-4
optimizer.weight_decay = 0.05
lr_multiplier.scheduler.milestones = [59150, 64074]
lr_multiplier.warmup_length = 250 / train.max_iter
