"""Detectron2 main's own ViTDet config with its backbone replaced by rev_det's, shrunk for CPU.

Loads ``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py`` from the Detectron2 source
tree that is imported (an editable source build of main), replaces
``model.backbone`` (ViT + SimpleFeaturePyramid) by RevViT + ReversibleFeaturePyramid, and
shrinks the rest to seconds per iteration: 2 narrow blocks, 64-channel pyramid and heads,
256-pixel LSJ crops, few RoIs, the shapes dataset (6 classes). The rest (the heads' structure,
the LSJ loader, AdamW with ViTDet's layer-wise lr decay, the schedule's shape, the trainer) is
ViTDet's. For main's unmodified ``tools/lazyconfig_train_net.py``, e.g. from its tree::

    python tools/lazyconfig_train_net.py \
        --config-file <rev_det>/tests/configs/vitdet_b_rev_vit_shapes.py
"""

import os
from functools import partial

import detectron2
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate

from rev_det.modeling import ReversibleFeaturePyramid, RevViT

_VITDET = os.path.join(
    os.path.dirname(os.path.dirname(detectron2.__file__)),
    "projects/ViTDet/configs/COCO/mask_rcnn_vitdet_b_100ep.py",
)
if not os.path.isfile(_VITDET):
    raise FileNotFoundError(
        f"{_VITDET} not found: this config needs a Detectron2 main source tree installed with "
        "`pip install -e` (docs/detectron2_versions.md)."
    )
_vitdet = LazyConfig.load(_VITDET)
model = _vitdet.model
dataloader = _vitdet.dataloader
optimizer = _vitdet.optimizer
lr_multiplier = _vitdet.lr_multiplier
train = _vitdet.train

_SIZE, _DEPTH = 256, 2
model.backbone = L(ReversibleFeaturePyramid)(
    net=L(RevViT)(
        img_size=_SIZE,
        patch_size=16,
        embed_dim=64,
        depth=_DEPTH,
        num_heads=2,
        drop_path_rate=0.0,
        window_size=8,
        window_block_indexes=[0],  # global attention in block 1
        use_abs_pos=True,
        use_rel_pos=True,
        pretrain_img_size=_SIZE,
        pretrain_use_cls_token=False,
        backprop="reversible",
    ),
    out_channels=64,
    num_blocks=1,
    scale_factors=(4.0, 2.0, 1.0, 0.5),
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    square_pad=_SIZE,
)
# ViTDet's heads (2-conv RPN head, 4-conv + 1-fc box head, 4-conv mask head, LayerNorm), at the
# pyramid's width instead of 256.
model.proposal_generator.head.in_channels = "${...backbone.out_channels}"
model.roi_heads.box_head.input_shape = L(ShapeSpec)(
    channels="${....backbone.out_channels}", height=7, width=7
)
model.roi_heads.box_head.conv_dims = [64, 64, 64, 64]
model.roi_heads.box_head.fc_dims = [256]
model.roi_heads.box_predictor.input_shape = L(ShapeSpec)(channels=256)  # the fc's
model.roi_heads.mask_head.input_shape = L(ShapeSpec)(
    channels="${....backbone.out_channels}", height=14, width=14
)
model.roi_heads.mask_head.conv_dims = [64, 64, 64, 64]
model.proposal_generator.pre_nms_topk = (200, 100)
model.proposal_generator.post_nms_topk = (50, 20)
model.proposal_generator.batch_size_per_image = 64
model.roi_heads.num_classes = 6
model.roi_heads.batch_size_per_image = 16
model.roi_heads.box_predictor.test_topk_per_image = 20
# Keep the barely trained model's low-scoring detections, so that both COCO tasks are evaluated.
model.roi_heads.box_predictor.test_score_thresh = 0.0

dataloader.train.dataset.names = "revdet_shapes_train"
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=_SIZE, target_width=_SIZE),
    L(T.FixedSizeCrop)(crop_size=(_SIZE, _SIZE), pad=False),
]
dataloader.train.mapper.instance_mask_format = "bitmask"  # the shapes dataset stores RLE
dataloader.train.total_batch_size = 2
dataloader.train.num_workers = 0
dataloader.test.dataset.names = "revdet_shapes_val"
dataloader.test.mapper.augmentations = [
    L(T.ResizeShortestEdge)(short_edge_length=_SIZE, max_size=_SIZE)
]
dataloader.test.num_workers = 0

optimizer.params.lr_factor_func = partial(
    get_vit_lr_decay_rate, num_layers=_DEPTH, lr_decay_rate=0.7
)

train.init_checkpoint = ""  # ViTDet's is MAE ViT-B, another architecture and a download
train.device = "cpu"
train.amp.enabled = False  # ViTDet trains in float16 on GPUs
train.max_iter = 4
train.eval_period = 0  # evaluate once, after training
train.checkpointer.period = 1000
train.log_period = 2
lr_multiplier.scheduler.milestones = [3]
lr_multiplier.scheduler.values = [1.0, 0.1]
lr_multiplier.scheduler.num_updates = train.max_iter
lr_multiplier.warmup_length = 1 / train.max_iter
