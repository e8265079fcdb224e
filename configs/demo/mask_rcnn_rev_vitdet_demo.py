"""LazyConfig twin of mask_rcnn_rev_vitdet_demo.yaml: the demo's detector with RevViTDet (a plain
ViT of the demo's size and stem as its reversible surrogate) in ViTDet's simple pyramid."""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from rev_det.modeling import RevViTDet, SimpleFeaturePyramid

from .mask_rcnn_rev_vit_demo import dataloader, lr_multiplier, model, optimizer, train

_trunk = {k: v for k, v in model.backbone.net.items() if k not in ("_target_", "backprop")}
model.backbone = L(SimpleFeaturePyramid)(
    net=L(RevViTDet)(**_trunk, backprop="reversible"),
    in_feature="last_feat",
    out_channels=64,
    top_block=L(LastLevelMaxPool)(),
    norm="LN",
    recompute=True,
)
train.init_checkpoint = ""  # a pretrained plain ViT trunk of this config
train.coupling = dict(alpha=(1.0, 0.0), beta=(0.0, 1.0), ramp=(0.0, 0.25))
train.output_dir = "output/demo_vitdet_lazy"
