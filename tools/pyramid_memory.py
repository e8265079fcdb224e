#!/usr/bin/env python
"""Memory and time of the pyramid adapters alone on a ViT trunk's output (CPU).

Feeds fixed two-stream trunk outputs (created before measuring, so they are not counted) to
the simple pyramid (ViTDet's, from the stream width C, as ``MODEL.REV.PYRAMID "simple"``
builds it) and to ReversibleFeaturePyramid in each backprop mode, and reports what each keeps
between forward and backward ("stored") and the peak of forward + backward, with frozen weights
(parameter gradients excluded; exact tracker). On Detectron2 main, Detectron2's own
``SimpleFeaturePyramid`` (ViTDet's) is measured beside them, on a fixed C-channel map (a ViT's
output). With ``--repeats`` it also times forward + backward with trainable weights: the median
of that many interleaved runs after a warm-up, and each adapter's time over the simple
pyramid's and Detectron2's, paired round by round.

Usage: ``python tools/pyramid_memory.py --size 1024 --dim 768 [--repeats 5]``
"""

import argparse
import statistics

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from torch import nn

from rev_det.benchmark import interleaved_times, vitdet_pyramid
from rev_det.benchmark.measure import paired_ratio
from rev_det.modeling import ReversibleFeaturePyramid, SimpleFeaturePyramid, TwoStreamTrunk
from rev_det.reversible import ReversibleSequence
from rev_det.utils import MemoryTracker, MiB

SIMPLE = "SimpleFeaturePyramid (autograd)"
DETECTRON2 = "Detectron2 SimpleFeaturePyramid (ViTDet, autograd)"
REFERENCES = {SIMPLE: "simple", DETECTRON2: "Detectron2"}


class FixedStreams(TwoStreamTrunk):
    """A stand-in trunk returning given streams (as RevViT's forward_streams/fuse would)."""

    def __init__(self, x1, x2, backprop):
        super().__init__()
        self.blocks = ReversibleSequence([], backprop)  # no blocks: it holds the trunk's mode
        self.x1, self.x2 = x1, x2
        self.norm = nn.LayerNorm(2 * x1.shape[1])
        self._out_features = ["last_feat"]
        self._out_feature_channels = {"last_feat": 2 * x1.shape[1]}

    def forward_streams(self, images):
        return self.x1, self.x2

    def fuse(self, x1, x2):
        x = self.norm(torch.cat([x1, x2], 1).permute(0, 2, 3, 1))
        return x.permute(0, 3, 1, 2).contiguous()  # as RevViT.fuse

    def output_shape(self):
        return {"last_feat": ShapeSpec(channels=2 * self.x1.shape[1], stride=16)}


class FixedMap(Backbone):
    """A stand-in ViT returning a given map as its stride-16 ``last_feat``."""

    def __init__(self, x):
        super().__init__()
        self.x = x
        self._out_features = ["last_feat"]

    def forward(self, images):
        return {"last_feat": self.x}

    def output_shape(self):
        return {"last_feat": ShapeSpec(channels=self.x.shape[1], stride=16)}


def measure(pyramid):
    pyramid.train().requires_grad_(False)
    with MemoryTracker() as mem:
        outputs = pyramid(None)
        stored = mem.current
        sum(o.sum() for o in outputs.values()).backward()
    return stored / MiB, mem.peak / MiB


def seconds(pyramids, repeats):
    """Each pyramid's forward + backward times, runs interleaved, after a warm-up."""

    def step(pyramid):
        def run():
            pyramid.zero_grad(set_to_none=True)
            sum(o.sum() for o in pyramid(None).values()).backward()

        return run

    steps = [step(pyramid.train()) for pyramid in pyramids.values()]
    for run in steps:
        run()
    return dict(zip(pyramids, interleaved_times(steps, repeats, "cpu")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image size (stride-16 trunk)")
    parser.add_argument("--dim", type=int, default=768, help="width C of each stream")
    parser.add_argument("--out-channels", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per adapter (0: none)")
    args = parser.parse_args(argv)
    n = args.size // 16
    # (B, C, h, w) views of (B, h, w, C) tensors, as ViT and RevViT return their tokens.
    x1, x2 = (torch.randn(1, n, n, args.dim).permute(0, 3, 1, 2).requires_grad_() for _ in range(2))
    common = dict(out_channels=args.out_channels, top_block=LastLevelMaxPool(), norm="LN")

    def pyramids():
        torch.manual_seed(0)
        built = {
            SIMPLE: SimpleFeaturePyramid(FixedStreams(x1, x2, "autograd"), width=args.dim, **common)
        }
        for mode in ("autograd", "checkpoint", "reversible"):
            built[f"ReversibleFeaturePyramid ({mode})"] = ReversibleFeaturePyramid(
                FixedStreams(x1, x2, mode), **common
            )
        detectron2 = vitdet_pyramid(FixedMap(x1), args.out_channels)
        if detectron2 is not None:
            built[DETECTRON2] = detectron2
        return built

    rows = {name: measure(pyramid) for name, pyramid in pyramids().items()}
    times = seconds(pyramids(), args.repeats) if args.repeats else {}
    references = [name for name in (SIMPLE, DETECTRON2) if name in rows] if times else []
    head = f"| pyramid, {args.size}x{args.size}, C={args.dim} | stored MiB | vs simple | peak MiB |"
    head += " fwd+bwd s |" if times else ""
    print(head + "".join(f" vs {REFERENCES[name]} |" for name in references))
    print("|---|---|---|---|" + "---|" * (len(references) + bool(times)))
    for name, (stored, peak) in rows.items():
        row = f"| {name} | {stored:.1f} | {100 * stored / rows[SIMPLE][0]:.0f}% | {peak:.1f} |"
        if times:
            row += f" {statistics.median(times[name]):.2f} |"
        for reference in references:
            row += f" {paired_ratio(times[name], times[reference]):.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
