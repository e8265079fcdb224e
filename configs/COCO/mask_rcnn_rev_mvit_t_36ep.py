"""RevMViT-T Mask R-CNN on COCO, MViTv2's recipe: multi-scale 480-800 training, AdamW 1.6e-4,
36 epochs at batch 64. Train with projects/lazyconfig_train_net.py."""

import detectron2.data.transforms as T
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from rev_det.modeling import LayerNorm2d, RecomputedFPN, RevMViT
from rev_det.solver import get_optimizer_params
from rev_det.utils import detectron2_has_compiled_ops

model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.backbone = L(RecomputedFPN)(
    net=L(RevMViT)(
        img_size=224,
        embed_dim=96,
        depth=10,
        num_heads=1,
        last_block_indexes=(0, 2, 7, 9),
        drop_path_rate=0.2,
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
model.pixel_mean = [123.675, 116.28, 103.53]
model.pixel_std = [58.395, 57.12, 57.375]
model.input_format = "RGB"
model.proposal_generator.head.conv_dims = [-1, -1]
model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = LayerNorm2d
model.roi_heads.mask_head.conv_norm = LayerNorm2d

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=tuple(range(480, 801, 32)), sample_style="choice", max_size=1333
    ),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.mapper.image_format = "RGB"
dataloader.train.total_batch_size = 64
dataloader.evaluator.use_fast_impl = detectron2_has_compiled_ops()

train = model_zoo.get_config("common/train.py").train
train.max_iter = 66536  # 36 epochs of train2017 at batch 64
train.amp.enabled = True
train.init_checkpoint = ""  # e.g. MViTv2 ImageNet weights converted by tools/convert_pretrained.py
train.output_dir = "output/mask_rcnn_rev_mvit_t_36ep"

optimizer = L(torch.optim.AdamW)(
    params=L(get_optimizer_params)(base_lr="${..lr}", weight_decay="${..weight_decay}"),
    lr=1.6e-4,
    betas=(0.9, 0.999),
    weight_decay=0.05,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[59150, 64074], num_updates="${train.max_iter}"
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
