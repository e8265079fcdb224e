"""The Detectron2 that the set-up installs can build and train its stock Mask R-CNN on CPU."""

import pytest
import torch
from detectron2 import model_zoo
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from rev_det.utils import detectron2_has_compiled_ops


def test_stock_r50_fpn_mask_rcnn_trains_one_step_on_cpu():
    cfg = model_zoo.get_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml")
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg).train()
    instances = Instances((256, 320))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 20.0, 100.0, 120.0]]))
    instances.gt_classes = torch.tensor([3])
    instances.gt_masks = PolygonMasks([[[10, 20, 100, 20, 100, 120, 10, 120]]])
    image = torch.randint(0, 255, (3, 256, 320), dtype=torch.uint8)
    with EventStorage():
        losses = model([{"image": image, "instances": instances}])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.res4[0].conv1.weight.grad.abs().sum() > 0


def test_lazy_model_zoo_configs_are_installed():
    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    assert cfg.model.roi_heads.mask_in_features == ["p2", "p3", "p4", "p5"]


# The pure-Python Detectron2 v0.6 that `make setup` builds has a placeholder _C; a source build
# (e.g. of Detectron2 main, docs/detectron2_versions.md) has the compiled ops.
pure_python_build = not detectron2_has_compiled_ops()


@pytest.mark.skipif(not pure_python_build, reason="Detectron2 built with its compiled ops")
def test_pure_python_v06_build_compiled_ops_placeholder_names_the_op():
    from detectron2 import _C

    with pytest.raises(ImportError, match=r"_C\.nms_rotated .*built from source"):
        _C.nms_rotated


@pytest.mark.skipif(pure_python_build, reason="pure-Python Detectron2 build (make setup)")
def test_source_build_compiled_ops_run_on_cpu():
    from detectron2.layers import nms_rotated

    # Two rotated boxes (cx, cy, w, h, angle) that overlap almost entirely, and a distant one.
    boxes = torch.tensor([[50, 50, 40, 20, 30], [51, 50, 40, 20, 30], [150, 150, 10, 10, 0]])
    keep = nms_rotated(boxes.float(), torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]


def test_import_without_detectron2_says_how_to_install_it():
    import subprocess
    import sys

    code = "import sys; sys.modules['detectron2'] = None; import rev_det"  # hide Detectron2
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "rev_det needs Detectron2" in proc.stderr and "make setup" in proc.stderr


def test_exporter_and_flop_counter_import_without_caffe2():
    # v0.6 imported its Caffe2 exporter unconditionally; the set-up's build makes it optional.
    from detectron2.export import TracingAdapter
    from detectron2.utils.analysis import FlopCountAnalysis

    assert TracingAdapter and FlopCountAnalysis
