"""Inference export: the eval-mode Mask R-CNN traced through Detectron2's TracingAdapter, and the
backbone (trunk + pyramid: image -> p2..p6) exported to ONNX and run by onnxruntime."""

import os

import pytest
import torch
from detectron2.export import TracingAdapter
from detectron2.modeling import build_backbone, build_model
from helpers import ROOT, tiny_cfg, yacs_cfg

MVIT_DEMO = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_mvit_demo.yaml")
FIELDS = ("pred_boxes", "scores", "pred_classes", "pred_masks")


def tiny(kind: str):
    if kind == "rev_vit":
        return tiny_cfg()
    return yacs_cfg(
        MVIT_DEMO,
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    )  # fmt: skip


def images(n: int, hw=(192, 256)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, *hw), generator=g).float() for _ in range(n)]


def inference(model, image):
    return model.inference([{"image": image}], do_postprocess=False)[0]


@pytest.mark.parametrize("kind", ["rev_vit", "rev_mvit"])
def test_traced_mask_rcnn_matches_eager(kind):
    torch.manual_seed(0)
    model = build_model(tiny(kind)).eval()
    traced_on, checked_on = images(2)
    with torch.no_grad():
        adapter = TracingAdapter(model, traced_on, inference)
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        # Another image of the same size: the traced graph, not recorded values, gives the output.
        exported = adapter.outputs_schema(traced(checked_on))
        eager = inference(model, checked_on)
    assert len(eager) > 0
    assert len(exported) == len(eager)
    for field in FIELDS:
        a, b = exported.get(field), eager.get(field)
        a, b = getattr(a, "tensor", a), getattr(b, "tensor", b)
        torch.testing.assert_close(a, b, msg=lambda m: f"{field}: {m}")


@pytest.mark.parametrize("kind", ["rev_vit", "rev_mvit"])
def test_backbone_onnx_matches_eager(kind, tmp_path):
    pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) translates with it
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    backbone = build_backbone(tiny(kind)).eval()
    exported_on = torch.randn(1, 3, 192, 256, generator=torch.Generator().manual_seed(0))
    checked_on = torch.randn(1, 3, 192, 256, generator=torch.Generator().manual_seed(1))
    names = list(backbone.output_shape())
    path = str(tmp_path / "backbone.onnx")
    # Exported under no_grad: with parameters that require grad, the ONNX decomposition of
    # attention with an explicit bias mask breaks (see docs/export.md).
    with torch.no_grad():
        program = torch.onnx.export(
            backbone, (exported_on,), dynamo=True, input_names=["image"], output_names=names
        )
        eager = backbone(checked_on)
    program.save(path)
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names == ["p2", "p3", "p4", "p5", "p6"]
    outputs = session.run(names, {"image": checked_on.numpy()})
    for name, out in zip(names, outputs):
        torch.testing.assert_close(torch.from_numpy(out), eager[name], rtol=1e-4, atol=1e-4)
