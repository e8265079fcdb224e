"""LazyConfig twin of mask_rcnn_rev_mvit_demo.yaml: the RevViT demo with a small RevMViT trunk
and Detectron2's FPN recomputed in backward (projects/lazyconfig_train_net.py)."""

from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from rev_det.modeling import LayerNorm2d, RecomputedFPN, RevMViT

from .mask_rcnn_rev_vit_demo import dataloader, lr_multiplier, model, optimizer, train

model.backbone = L(RecomputedFPN)(
    net=L(RevMViT)(
        img_size=224,
        embed_dim=32,
        depth=6,
        num_heads=1,
        last_block_indexes=(0, 1, 4, 5),
        drop_path_rate=0.0,
        adaptive_window_size=16,
        backprop="reversible",
    ),
    in_features=["scale2", "scale3", "scale4", "scale5"],
    out_channels=64,
    norm=LayerNorm2d,
    top_block=L(LastLevelMaxPool)(),
    backprop="${.net.backprop}",
)
train.output_dir = "output/demo_rev_mvit_lazy"
# From scratch: the RevViT demo's pretrained trunk does not fit a RevMViT.
train.init_checkpoint = ""
train.strict_load = False
