"""Detectron2's own PointRend (detectron2.projects.point_rend) with a RevViT backbone:
projects/PointRend's configs and train_net.py."""

import json
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects.point_rend import PointRendMaskHead, add_pointrend_config
from helpers import ROOT, TINY_YACS, copypaste_ap, run

import rev_det
from rev_det.modeling import ReversibleFeaturePyramid, RevViT

CONFIGS = os.path.join(ROOT, "projects", "PointRend", "configs")
SHAPES = os.path.join(CONFIGS, "pointrend_rcnn_rev_vit_shapes.yaml")
COCO = os.path.join(CONFIGS, "pointrend_rcnn_rev_vit_b_coco.yaml")


def pointrend_cfg(path, *opts):
    cfg = get_cfg()
    add_pointrend_config(cfg)
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


@pytest.mark.parametrize("path", [SHAPES, COCO], ids=["shapes", "coco"])
def test_config_builds_pointrend_on_rev_vit(path):
    cfg = pointrend_cfg(path, "MODEL.DEVICE", "meta")
    with torch.device("meta"):  # structure only: no weights allocated
        model = build_model(cfg)
    mask_head = model.roi_heads.mask_head
    assert isinstance(mask_head, PointRendMaskHead) and mask_head.mask_point_on
    assert isinstance(model.backbone, ReversibleFeaturePyramid)
    assert isinstance(model.backbone.net, RevViT)
    assert cfg.MODEL.POINT_HEAD.NUM_CLASSES == cfg.MODEL.ROI_HEADS.NUM_CLASSES


@pytest.mark.slow
def test_pointrend_trains_and_evaluates(datasets_root, tmp_path):
    out = str(tmp_path / "out")
    # TINY_YACS narrows the pyramid to 32 channels; the coarse mask head must not be wider.
    opts = TINY_YACS + ["MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "SOLVER.MAX_ITER", "3"]
    log = run(
        os.path.join("PointRend", "train_net.py"),
        ["--config-file", SHAPES] + opts + ["OUTPUT_DIR", out],
        datasets_root,
    )
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    (last,) = [r for r in records if "total_loss" in r]
    assert last["iteration"] == 2
    losses = {k: v for k, v in last.items() if k.startswith("loss_")}
    assert {"loss_mask", "loss_mask_point", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert all(math.isfinite(v) for v in losses.values()), losses
    # The final evaluation runs PointRend's subdivision inference on the val images.
    trained = copypaste_ap(log)
    assert set(trained) == {"bbox", "segm"}

    # --eval-only reloads the final weights and reproduces that evaluation.
    weights = ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
    evaluated = run(
        os.path.join("PointRend", "train_net.py"),
        ["--config-file", SHAPES, "--eval-only"] + opts + ["OUTPUT_DIR", out] + weights,
        datasets_root,
    )
    assert copypaste_ap(evaluated) == trained
