"""The paper's Rev-MViT-B Mask R-CNN on COCO (its detection setting; the twin of
mask_rcnn_rev_mvit_b_paper.yaml): the official trunk (absolute positions, no relative positions,
no residual pooling, global attention) with FPN, Detectron2's MViTv2 recipe (the paper states no
schedule), derived from the T config."""

from rev_det.modeling import REVMVIT_PAPER_OPTIONS, REVMVIT_SIZES

from .mask_rcnn_rev_mvit_t_36ep import dataloader, lr_multiplier, model, optimizer, train

# The paper's Rev-MViT-B ("paper" layout, 16 blocks) in its official configuration.
model.backbone.net.update(REVMVIT_SIZES["paper_b"], **REVMVIT_PAPER_OPTIONS)
# PySlowFast's REV_MVIT_B.pyth converted by tools/convert_pretrained.py --source pyslowfast-revmvit
train.init_checkpoint = ""
train.output_dir = "output/mask_rcnn_rev_mvit_b_paper_36ep"
