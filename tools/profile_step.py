#!/usr/bin/env python
"""Where the time of one Mask R-CNN training step goes, per backprop mode.

Two views of the same detectors (``rev_det.benchmark``'s, from
``configs/COCO/mask_rcnn_<backbone>.yaml``; with Detectron2 main also its own ViTDet with the
same heads), on synthetic images:

components
    Forward + backward of the trunk alone, of the backbone (trunk + pyramid) and of the full
    step, each the median of ``--repeats`` interleaved runs after a warm-up; the pyramid is
    backbone - trunk, the RPN and ROI heads (losses included) step - backbone.
operators
    ``torch.profiler`` over one full step: self time per operator category (attention kernels,
    split by sequence length into global and window attention; linear layers; convolutions;
    norms; element-wise; data movement such as copies, cat and permutes; the rest). The
    recomputation of checkpointing and of the reversible backward shows as the extra forward
    operators against autograd.

Output: ``--out``/profile.md (tables, machine, command) and profile.json.

Example::

    python tools/profile_step.py --size 512 --modes autograd/simple checkpoint/simple \\
        reversible/reversible
"""

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from typing import Callable, Dict, List

import torch
from detectron2.modeling import build_model
from torch.profiler import ProfilerActivity, profile

from rev_det.benchmark import (
    backbone_forward,
    detection_forward,
    detector_cfg,
    interleaved_times,
    saturating_objects,
    synthetic_batch,
    training_step,
    vitdet_detector,
)
from rev_det.utils import git_commit, machine, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CATEGORIES = (
    "global attention",
    "window attention",
    "linear",
    "convolution",
    "norm",
    "element-wise",
    "data movement",
    "other",
)
_LINEAR = ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul")
_CONV = ("conv", "aten::_slow_conv2d", "aten::mkldnn_convolution", "aten::max_pool2d")
_NORM = ("layer_norm", "aten::native_layer_norm", "group_norm")
_MOVEMENT = (
    "aten::copy_",
    "aten::cat",
    "aten::clone",
    "aten::contiguous",
    "aten::pad",
    "aten::constant_pad_nd",
    "aten::index",
    "aten::index_put_",
    "aten::pixel_shuffle",
    "aten::pixel_unshuffle",
    "aten::_to_copy",
    "aten::fill_",
    "aten::zero_",
)
_ELEMENTWISE = (
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::mul",
    "aten::mul_",
    "aten::div",
    "aten::gelu",
    "aten::gelu_backward",
    "aten::sum",
    "aten::mean",
    "aten::where",
    "aten::threshold_backward",
    "aten::sigmoid",
)


def category(name: str, shapes, window_tokens: int) -> str:
    """The category of one profiler event (``name``, its input shapes)."""
    if "scaled_dot_product" in name or "_flash_attention" in name or "_efficient_attention" in name:
        # (B, heads, N, head dim): a window has window_size^2 tokens, a global block the image.
        n = shapes[0][2] if shapes and len(shapes[0]) == 4 else 0
        return "window attention" if 0 < n <= window_tokens else "global attention"
    if name in _LINEAR:
        return "linear"
    if any(key in name for key in _CONV):
        return "convolution"
    if any(key in name for key in _NORM):
        return "norm"
    if name in _MOVEMENT:
        return "data movement"
    if name in _ELEMENTWISE:
        return "element-wise"
    return "other"


def median_seconds(steps: Dict[str, Callable[[], None]], repeats: int) -> Dict[str, float]:
    """Median seconds of each step, run in turn ``repeats`` times after one warm-up each."""
    for step in steps.values():
        step()
    times = interleaved_times(list(steps.values()), repeats, "cpu")
    return {name: statistics.median(t) for name, t in zip(steps, times)}


def profile_mode(args, backprop: str, pyramid: str) -> dict:
    vitdet = pyramid == "vitdet"
    cfg = detector_cfg(
        args.backbone,
        "autograd" if vitdet else backprop,
        "simple" if vitdet else pyramid,
        "cpu",
        args.opts,
    )
    torch.manual_seed(0)
    if vitdet:
        model = vitdet_detector(cfg, backprop == "checkpoint", args.size)
        if model is None:
            raise SystemExit(f"{backprop}/vitdet: this Detectron2 has no ViT (use Detectron2 main)")
    else:
        model = build_model(cfg)
    model.train()
    objects = saturating_objects(cfg)  # the same head workload for every detector
    data = synthetic_batch(args.size, args.batch, cfg.MODEL.ROI_HEADS.NUM_CLASSES, "cpu", objects)
    # Square synthetic images of a size divisible by every stride: no padding anywhere.
    images = model.preprocess_image(data).tensor
    backbone = model.backbone
    step_forward = detection_forward(model, data, False)
    seconds = median_seconds(
        {
            # The trunk alone, its features reduced to a scalar as for the whole backbone.
            "trunk": training_step(backbone_forward(backbone.net, images, False), model),
            "backbone": training_step(backbone_forward(backbone, images, False), model),
            "step": training_step(step_forward, model),
        },
        args.repeats,
    )
    components = {
        "trunk": seconds["trunk"],
        "pyramid": seconds["backbone"] - seconds["trunk"],
        "RPN + ROI heads": seconds["step"] - seconds["backbone"],
        "step": seconds["step"],
    }
    window = cfg.MODEL.REVVIT.WINDOW_SIZE**2
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        training_step(step_forward, model)()
    ops = defaultdict(float)
    for event in prof.events():
        # Self time, so that nested operators are not counted twice.
        ops[category(event.name, event.input_shapes, window)] += event.self_cpu_time_total / 1e6
    total = sum(ops.values())
    return {
        "backprop": backprop,
        "pyramid": pyramid,
        "components": components,
        "operators": {c: ops.get(c, 0.0) for c in CATEGORIES},
        "profiled_total": total,
    }


def report(args, rows: List[dict]) -> str:
    labels = [f"{r['backprop']} + {r['pyramid']}" for r in rows]
    md = [
        f"# Profile of one training step: {args.backbone}, {args.size}x{args.size}, "
        f"batch {args.batch}, fp32",
        "",
        f"- machine: {machine()}; torch {torch.__version__}; rev_det {git_commit(ROOT)}",
        f"- command: `python tools/profile_step.py {' '.join(sys.argv[1:])}`",
        "",
        f"## Components (seconds, median of {args.repeats} interleaved runs after a warm-up)",
        "",
        "| component | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for name in rows[0]["components"]:
        cells = [f"{r['components'][name]:.2f}" for r in rows]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += [
        "",
        "## Operators (self time in seconds over one profiled step; share of that step)",
        "",
        "| category | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for name in CATEGORIES:
        cells = [
            f"{r['operators'][name]:.2f} ({r['operators'][name] / r['profiled_total']:.0%})"
            for r in rows
        ]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md.append("| total | " + " | ".join(f"{r['profiled_total']:.2f}" for r in rows) + " |")
    md += [
        "",
        "The profiled step runs under the profiler, which slows it; compare the categories "
        "within a column and across columns, not with the component times.",
        "",
    ]
    return "\n".join(md)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", choices=["rev_vit_b", "rev_vit_l"], default="rev_vit_b")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["autograd/simple", "checkpoint/simple", "reversible/reversible"],
        metavar="BACKPROP/PYRAMID",
        help="detectors: rev_det's (backprop/pyramid) and Detectron2 main's ViTDet "
        "(autograd/vitdet, checkpoint/vitdet); default: rev_det's autograd/simple, "
        "checkpoint/simple and reversible/reversible",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--opts", nargs="+", default=[], help="KEY VALUE ... config overrides")
    parser.add_argument("--out", default=None, help="default benchmarks/profile_<backbone>_<size>")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(ROOT, "benchmarks", f"profile_{args.backbone}_{args.size}")
    rows = []
    for backprop, pyramid in (mode.split("/") for mode in args.modes):
        print(f"profiling {backprop} + {pyramid} at {args.size}", flush=True)
        rows.append(profile_mode(args, backprop, pyramid))
        print(json.dumps(rows[-1]["components"]), flush=True)
    text = report(args, rows)
    write_results(args.out, text, rows, name="profile")
    print(text)
    return rows


if __name__ == "__main__":
    main()
