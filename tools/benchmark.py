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
import sys

from rev_det.benchmark import BACKBONES, SECTIONS, BenchmarkOptions, describe_sections, run
from rev_det.benchmark.sections.classification import CLASSIFIERS


def parse_args(argv=None) -> BenchmarkOptions:
    """The benchmark options of the command line ``argv`` (default ``sys.argv``)."""
    parser = argparse.ArgumentParser(
        # Each section describes itself where it is defined (rev_det.benchmark.sections).
        description=__doc__.format(sections=describe_sections()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    add = parser.add_argument
    add(
        "--backbone",
        choices=sorted(BACKBONES),
        help="detector: configs/COCO/mask_rcnn_<backbone>.yaml (default rev_vit_b)",
    )
    add(
        "--size",
        type=int,
        help="square input size of the detection, depth and speed sections (default 1024)",
    )
    add(
        "--batch",
        type=int,
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
        help="depths of the depth section (default 6 12 24 48)",
    )
    add(
        "--depth-scope",
        choices=["trunk", "step"],
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
        help="input sizes of the resolution section (default 256 512 768 1024)",
    )
    add(
        "--classifiers",
        nargs="+",
        choices=sorted(CLASSIFIERS),
        help="trunks of the classification section (default vit_b vit_l)",
    )
    add(
        "--cls-batches",
        type=int,
        nargs="+",
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
        help="speed section: the batches timed (default 1)",
    )
    add("--repeats", type=int, help="speed section: timed steps per detector (default 5)")
    add(
        "--warmup",
        type=int,
        help="speed section: untimed steps per detector first, at least 1 (default 2)",
    )
    add(
        "--max-batch",
        type=int,
        help="speed section (CUDA): upper limit of the largest-batch search, 0 for none "
        "(default 512)",
    )
    add(
        "--budget-gib",
        type=float,
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
        help="whole_step section: also time this many paired rounds of an iteration stepping "
        "after backward and one stepping inside it (both models held at once; default 0: "
        "memory only)",
    )
    add("--amp", action="store_true", help="bf16 autocast (default fp32)")
    add(
        "--device",
        choices=["cpu", "cuda"],
        help="default: cuda if available",
    )
    add("--opts", nargs="+", help="KEY VALUE ... overrides of the detector config")
    add("--out", help="output folder (default benchmarks/<backbone>_<size>_<device>)")
    # Flags not given are left out, so that the options' own defaults apply (one place).
    args = parser.parse_args(argv)
    try:
        return BenchmarkOptions(**vars(args))
    except ValueError as e:
        parser.error(str(e))


def main(argv=None) -> dict:
    """Run the benchmark of the command line ``argv`` (default ``sys.argv``); its results."""
    options = parse_args(argv)
    command = ["python", "tools/benchmark.py"] + (argv if argv is not None else sys.argv[1:])
    return run(options, " ".join(command))


if __name__ == "__main__":
    main()
