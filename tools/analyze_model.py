#!/usr/bin/env python
"""Parameter counts and FLOPs of rev_det's Mask R-CNN configs (fvcore, as Detectron2 counts).

For each yacs config (default: the six shipped COCO configs) the model is built in eval mode and

* parameters are counted for the whole model, the backbone (trunk + pyramid) and the trunk;
* FLOPs are counted with Detectron2's ``FlopCountAnalysis`` (fvcore, one FLOP per multiply-add,
  elementwise ops not counted) on one image of the config's test size: a 640x480 image (the
  most common COCO size) resized by ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, then padded by
  the model as in inference. The score threshold is set to 0 so that the box head sees all
  ``RPN.POST_NMS_TOPK_TEST`` proposals and the mask head ``TEST.DETECTIONS_PER_IMAGE``
  detections: the count of the heads is their maximum, independent of the random weights;
* fvcore has no rule for ``aten::scaled_dot_product_attention``, which all of rev_det's attention
  goes through: it is counted here as its two matmuls (q k^T and attention times v);
* RevViT's global blocks fold the relative position bias into q and k (the head dim grows by
  H + W, see ``rev_det.modeling.attention``), which widens their attention matmuls. The FLOPs
  are those executed; for RevViT the trunk is also counted with the bias explicit
  (``trunk_explicit``), which is how ViTDet's implementation computes it;
* ``--trunk-size S`` also counts the trunk alone on an S x S image (e.g. 224, to compare with
  ImageNet numbers of ViT and MViTv2).

In eval mode every backprop mode runs the same plain modules, so the counts do not depend on
``MODEL.REV.BACKPROP``. Results go to ``--out``: ``results.md`` (the table, the machine, the
torch version and the command) and ``results.json``.

Examples::

    python tools/analyze_model.py --trunk-size 224
    python tools/analyze_model.py --config-file configs/COCO/mask_rcnn_rev_vit_b.yaml \\
        --params-only
    python tools/analyze_model.py --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml \\
        --out /tmp/analysis --opts MODEL.REV.BACKPROP autograd
"""

import argparse
import contextlib
import json
import os
import sys
import time
from math import prod
from typing import Dict, List, Optional, Sequence, Tuple

import detectron2
import torch
from detectron2.config import get_cfg
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.modeling import build_model
from fvcore.nn import parameter_count
from fvcore.nn.jit_handles import get_shape
from torch import nn

import rev_det
from rev_det.modeling import RevMViT, RevViT
from rev_det.modeling.rev_vit import Attention
from rev_det.utils import git_commit, machine, write_results

try:
    from detectron2.utils.analysis import FlopCountAnalysis
except ModuleNotFoundError as e:
    if e.name != "caffe2":
        raise
    raise ImportError(
        "detectron2.utils.analysis imports detectron2.export, whose v0.6 __init__ imports Caffe2, "
        "which PyTorch >= 2.0 no longer ships. Reinstall the Detectron2 that rev_det builds, where "
        "the Caffe2 exporter is optional as in Detectron2 main: `pip install --force-reinstall "
        "--no-deps $(python tools/build_detectron2.py)`, or install Detectron2 from its main branch."
    ) from e

__all__ = ["analyze", "sdpa_flop_jit", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = [
    os.path.join("configs", "COCO", f"mask_rcnn_rev_{name}.yaml")
    for name in ("vit_b", "vit_l", "vit_h", "mvit_t", "mvit_s", "mvit_b")
]
COCO_IMAGE_HW = (480, 640)


def sdpa_flop_jit(inputs, outputs) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: q k^T plus attention times v.

    With q of shape (..., Nq, Dqk), k (..., Nk, Dqk) and v (..., Nk, Dv): ``prod(...) * Nq * Nk *
    (Dqk + Dv)`` multiply-adds. The softmax and an additive mask are elementwise and, as in
    fvcore's other rules, not counted.
    """
    q, k, v = (get_shape(x) for x in inputs[:3])
    return prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def load_cfg(path: str, opts: Sequence[str]):
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    # Every proposal reaches the box head and the mask head runs on the most detections.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    return cfg


def input_hw(cfg) -> Tuple[int, int]:
    """A 640x480 image after the config's test-time resize."""
    return ResizeShortestEdge.get_output_shape(
        *COCO_IMAGE_HW, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
    )


def find_trunk(backbone: nn.Module) -> Tuple[str, nn.Module]:
    """The RevViT / RevMViT inside a backbone, with its module name relative to the backbone."""
    for name, module in backbone.named_modules():
        if isinstance(module, (RevViT, RevMViT)):
            return name, module
    raise ValueError(
        f"{type(backbone).__name__} contains no RevViT or RevMViT: analyze_model.py counts "
        "rev_det's backbones (MODEL.BACKBONE.NAME build_rev_vit_backbone / build_rev_mvit_backbone)."
    )


def flop_analysis(model: nn.Module, inputs) -> FlopCountAnalysis:
    flops = FlopCountAnalysis(model, inputs)
    flops.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    return flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)


@contextlib.contextmanager
def explicit_rel_pos(trunk: nn.Module):
    """Run RevViT's global blocks with an explicit relative-position bias instead of folding it."""
    attentions = [m for m in trunk.modules() if isinstance(m, Attention) and m.fold_rel_pos]
    for m in attentions:
        m.fold_rel_pos = False
    try:
        yield
    finally:
        for m in attentions:
            m.fold_rel_pos = True


def image(hw: Tuple[int, int], channels: int = 3) -> torch.Tensor:
    """A deterministic image in [0, 255] (FLOPs do not depend on its content)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(channels, *hw, generator=generator) * 255


def analyze(
    config_file: str,
    opts: Sequence[str] = (),
    flops: bool = True,
    trunk_size: Optional[int] = None,
) -> Dict:
    """Parameter counts and FLOPs of one config (see the module docstring).

    Returns:
        A dict with ``config``, ``backprop``, ``params`` (model / backbone / trunk) and, with
        ``flops``, ``input_hw``, ``flops`` (model / backbone / trunk and, for RevViT,
        ``trunk_explicit``; with ``trunk_size`` also ``trunk_at_size``), ``skipped_ops`` (ops
        fvcore does not count) and ``seconds``.
    """
    start = time.time()
    cfg = load_cfg(config_file, opts)
    torch.manual_seed(0)
    if flops:
        model = build_model(cfg).eval()
    else:
        # Shapes are all that counting parameters needs: skip allocation and initialisation.
        with torch.device("meta"):
            cfg.MODEL.DEVICE = "meta"
            model = build_model(cfg).eval()
    trunk_name, trunk = find_trunk(model.backbone)
    params = parameter_count(model)
    result = {
        "config": os.path.relpath(os.path.abspath(config_file), ROOT),
        "backprop": cfg.MODEL.REV.BACKPROP,
        "params": {
            "model": params[""],
            "backbone": params["backbone"],
            "trunk": params[f"backbone.{trunk_name}"],
        },
    }
    if flops:
        hw = input_hw(cfg)
        with torch.no_grad():
            analysis = flop_analysis(model, [{"image": image(hw)}])
            by_module = analysis.by_module()
            result["input_hw"] = list(hw)
            result["flops"] = {
                "model": analysis.total(),
                "backbone": by_module["model.backbone"],
                "trunk": by_module[f"model.backbone.{trunk_name}"],
            }
            result["skipped_ops"] = sorted(analysis.unsupported_ops())
            if isinstance(trunk, RevViT) and cfg.MODEL.REVVIT.USE_REL_POS:
                # The backbone again, on the image as the model normalises and pads it.
                images = model.preprocess_image([{"image": image(hw)}]).tensor
                with explicit_rel_pos(trunk):
                    explicit = flop_analysis(model.backbone, (images,))
                    result["flops"]["trunk_explicit"] = explicit.by_module()[f"model.{trunk_name}"]
            if trunk_size:
                square = image((trunk_size, trunk_size))[None]
                at_size = flop_analysis(trunk, (square,))
                result["flops"]["trunk_at_size"] = at_size.total()
                result["trunk_size"] = trunk_size
    result["seconds"] = round(time.time() - start, 1)
    return result


def _m(n: Optional[float]) -> str:
    return "" if n is None else f"{n / 1e6:.1f}"


def _g(n: Optional[float]) -> str:
    return "" if n is None else f"{n / 1e9:.1f}"


def render(results: Dict) -> str:
    lines = [
        "# Parameters and FLOPs of rev_det's configs",
        "",
        f"- machine: {results['machine']}",
        f"- torch {results['torch']}, detectron2 {results['detectron2']}, commit {results['commit']}",
        f"- command: `{results['command']}`",
        "",
        "FLOPs: fvcore via Detectron2's FlopCountAnalysis, one FLOP per multiply-add, elementwise "
        "ops not counted; SDPA counted as its two matmuls. One image of the test size (a 640x480 "
        "image through the config's test resize), score threshold 0 (box head on all "
        "post-NMS proposals, mask head on TEST.DETECTIONS_PER_IMAGE detections). Trunk "
        "(explicit bias): RevViT with the relative position bias of global blocks added as a "
        "mask, as ViTDet computes it, instead of folded into q and k. Time: wall-clock seconds of "
        "the analysis of one config (build and every count) on this machine.",
        "",
        "| config | backprop | params (M): model | backbone | trunk | input | GFLOPs: model "
        "| backbone | trunk | trunk (explicit bias) | trunk at SxS | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        p, f = r["params"], r.get("flops", {})
        size = f"{r['trunk_size']}: {_g(f['trunk_at_size'])}" if "trunk_at_size" in f else ""
        hw = "x".join(map(str, r["input_hw"])) if "input_hw" in r else ""
        lines.append(
            f"| {r['config']} | {r['backprop']} | {_m(p['model'])} | {_m(p['backbone'])} "
            f"| {_m(p['trunk'])} | {hw} | {_g(f.get('model'))} | {_g(f.get('backbone'))} "
            f"| {_g(f.get('trunk'))} | {_g(f.get('trunk_explicit'))} | {size} | {r['seconds']} |"
        )
    skipped = sorted({op for r in results["runs"] for op in r.get("skipped_ops", [])})
    if skipped:
        lines += ["", "Ops fvcore does not count (elementwise or indexing): " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        nargs="+",
        default=SHIPPED,
        help="yacs configs to analyse (default: the six shipped COCO configs)",
    )
    parser.add_argument(
        "--params-only", action="store_true", help="count parameters only (fast: no forward)"
    )
    parser.add_argument(
        "--trunk-size", type=int, help="also count the trunk alone on a square image of this side"
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "model_analysis"))
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every config"
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict:
    args = parse_args(argv)
    results = {
        "machine": machine(),
        "torch": torch.__version__,
        "detectron2": detectron2.__version__,
        "commit": git_commit(ROOT),
        "command": " ".join(
            ["python", "tools/analyze_model.py"] + (argv if argv is not None else sys.argv[1:])
        ),
        "runs": [],
    }
    for path in args.config_file:
        run = analyze(path, args.opts, not args.params_only, args.trunk_size)
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
    text = render(results)
    write_results(args.out, text, results)
    print(text)
    return results


if __name__ == "__main__":
    main()
