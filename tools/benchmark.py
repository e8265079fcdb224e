#!/usr/bin/env python
"""Memory (and, on CUDA, speed) of rev_det's backbones, every backprop mode side by side.

One model architecture is measured with backprop "autograd" (every activation stored),
"checkpoint" (torch.utils.checkpoint per block) and "reversible" (rev_det's engine): same
parameters and gradients, only memory and time differ. Baselines use the stored pyramid
ViTDet uses ("simple" for RevViT, Detectron2's "fpn" for RevMViT); "reversible" uses rev_det's
reversible pyramid.

Sections (``--sections``; they always run in this order, so that the sweeps' smaller runs come
first and let the memory budget predict the larger ones, and a detector measured by one section
is not measured again by the next):

{sections}

Memory: on CPU the exact tensor tracker :class:`rev_det.utils.MemoryTracker` (bytes of live
tensor storages, no allocator noise); on CUDA ``torch.cuda.max_memory_allocated`` after a
reset (run on an H200: docs/gpu.md). "peak" counts everything the step creates
(activations, temporaries, parameter gradients); parameters themselves are listed apart and
optimizer state is not included; "activations" is the peak of everything but parameter
gradients (on CUDA: peak minus the gradients alive at the end); "stored" is what is alive
between forward and backward. Times are only compared as ratios within one run.

Memory budget (CPU): a measurement whose tensor memory (parameters + peak), predicted by a
straight line through the last two points of the same configuration along depth, size or
batch, exceeds ``--budget-gib`` is skipped and reported with that prediction, marked as such.
Along depth the line is exact for stored activations (every block adds the same bytes: compare
the slopes printed in the depth table); along size it is only an estimate.

Output in ``--out``, rewritten after every section: ``results.md`` (tables, the machine, torch
version and the exact command), ``results.json`` and PNG plots (memory vs depth, memory vs
resolution, memory per image vs batch, throughput vs batch).

Examples::

    python tools/benchmark.py --backbone rev_vit_b --size 1024 --sections detection
    python tools/benchmark.py --backbone rev_vit_b --size 512 --sections depth --depths 6 12 24 48
    python tools/benchmark.py --backbone rev_vit_l --size 1024 --sections depth detection \\
        --depth-scope step --depths 6 12 18 --budget-gib 10.5
    python tools/benchmark.py --sections classification --cls-batches 4 16 64
"""

import argparse
import os
import sys

import torch

from rev_det.benchmark import BACKBONES, SECTIONS, GiB, describe_sections, run
from rev_det.benchmark.sections.classification import CLASSIFIERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line, with the defaults that depend on the device filled in."""
    parser = argparse.ArgumentParser(
        # Each section describes itself where it is defined (rev_det.benchmark.sections).
        description=__doc__.format(sections=describe_sections()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--backbone",
        choices=sorted(BACKBONES),
        default="rev_vit_b",
        help="detector: configs/COCO/mask_rcnn_<backbone>.yaml (default rev_vit_b)",
    )
    add(
        "--size",
        type=int,
        default=1024,
        help="square input size of the detection, depth and speed sections (default 1024)",
    )
    add(
        "--batch",
        type=int,
        default=1,
        help="images per step in the detection, depth, resolution and speed sections",
    )
    add(
        "--sections",
        nargs="+",
        choices=list(SECTIONS),
        help="what to measure (see above); default: detection depth classification, and speed "
        "on CUDA",
    )
    add(
        "--depths",
        type=int,
        nargs="+",
        default=[6, 12, 24, 48],
        help="depths of the depth section (default 6 12 24 48)",
    )
    add(
        "--depth-scope",
        choices=["trunk", "step"],
        default="trunk",
        help="depth section: the RevViT trunk alone (default) or the full Mask R-CNN step",
    )
    add(
        "--pairs",
        nargs="+",
        metavar="BACKPROP/PYRAMID",
        help="restrict the detection, depth (step scope), resolution and speed sections to "
        "these pairs, e.g. autograd/simple reversible/reversible (default: all)",
    )
    add(
        "--sizes",
        type=int,
        nargs="+",
        default=[256, 512, 768, 1024],
        help="input sizes of the resolution section (default 256 512 768 1024)",
    )
    add(
        "--classifiers",
        nargs="+",
        choices=sorted(CLASSIFIERS),
        default=["vit_b", "vit_l"],
        help="trunks of the classification section (default vit_b vit_l)",
    )
    add(
        "--cls-batches",
        type=int,
        nargs="+",
        default=[4, 16, 64],
        help="batches of the classification section (default 4 16 64)",
    )
    add(
        "--no-vitdet",
        dest="vitdet",
        action="store_false",
        help="speed section: leave out Detectron2's ViTDet (timed first, with autograd and with "
        "activation checkpointing, when Detectron2 has it: main, not v0.6)",
    )
    add(
        "--speed-batches",
        type=int,
        nargs="+",
        default=[1],
        help="speed section: the batches timed (default 1)",
    )
    add(
        "--repeats", type=int, default=5, help="speed section: timed steps per detector (default 5)"
    )
    add(
        "--warmup",
        type=int,
        default=2,
        help="speed section: untimed steps per detector first, at least 1 (default 2)",
    )
    add(
        "--max-batch",
        type=int,
        default=512,
        help="speed section (CUDA): upper limit of the largest-batch search, 0 for none "
        "(default 512)",
    )
    add(
        "--budget-gib",
        type=float,
        default=None,
        help="skip a measurement predicted to need more tensor memory (parameters + peak) "
        "than this many GiB; default on CPU half the machine's RAM, on CUDA none",
    )
    add(
        "--step-only",
        action="store_true",
        help="detection section: measure the full step only, not the backbone alone as well "
        "(about half the time)",
    )
    add(
        "--whole-step-rounds",
        type=int,
        default=0,
        help="whole_step section: also time this many paired rounds of an iteration stepping "
        "after backward and one stepping inside it (both models held at once; default 0: "
        "memory only)",
    )
    add("--amp", action="store_true", help="bf16 autocast (default fp32)")
    add(
        "--device",
        choices=["cpu", "cuda"],
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available",
    )
    add("--opts", nargs="+", default=[], help="KEY VALUE ... overrides of the detector config")
    add("--out", help="output folder (default benchmarks/<backbone>_<size>_<device>)")
    args = parser.parse_args(argv)
    if args.sections is None:
        args.sections = ["detection", "depth", "classification"]
        args.sections += ["speed"] if args.device == "cuda" else []
    if args.warmup < 1 or args.repeats < 1:
        parser.error(
            "--warmup and --repeats must be at least 1 (the first warm-up step measures "
            "the peak memory)"
        )
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", f"{args.backbone}_{args.size}_{args.device}")
    if args.budget_gib is None and args.device == "cpu":
        args.budget_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / 2
    return args


def main(argv=None) -> dict:
    """Run the benchmark of the command line ``argv`` (default ``sys.argv``); its results."""
    args = parse_args(argv)
    command = ["python", "tools/benchmark.py"] + (argv if argv is not None else sys.argv[1:])
    return run(args, " ".join(command))


if __name__ == "__main__":
    main()
