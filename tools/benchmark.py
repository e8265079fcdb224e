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

depth
    Memory against depth at fixed width (``--depths``) and the slope per block, per mode.
    ``--depth-scope trunk`` measures the RevViT trunk alone (activations only);
    ``--depth-scope step`` the full Mask R-CNN step of a RevViT detector of that depth (its
    global-attention blocks evenly spaced as in the configured model), for every pair of the
    detection section (or those of ``--pairs``).
resolution
    Full-step peak memory against input size (``--sizes``) for the baseline, checkpoint and
    reversible detectors.
detection
    Peak memory of one full Mask R-CNN training step (forward, losses, backward) at ``--size``
    and of the backbone + pyramid alone (unless ``--step-only``), for every (backprop, pyramid)
    pair (or those of ``--pairs``), split into parameter gradients and activations, and the
    memory kept between forward and backward.
classification
    The paper's setting: per-image training memory of ViT-sized reversible trunks with global
    average pooling and a linear head at 224x224 (``--classifiers``), at each of
    ``--cls-batches``, the marginal memory per added image between the two largest batches,
    and the paper's per-image figures beside them.
speed
    Training step time of Detectron2's own ViTDet with autograd and with activation
    checkpointing (same RPN and heads; Detectron2 main only), then rev_det's baseline, checkpoint
    and reversible detectors (on CUDA also the reversible one with the parallel backward) at
    each of ``--speed-batches``: the median of
    ``--repeats`` steps, interleaved across the detectors, after ``--warmup`` steps (CUDA events
    on CUDA, the wall clock on CPU), images per second and the step's peak memory; on CUDA also
    the largest batch that fits in the card's memory per detector (doubling, then bisection; at
    most ``--max-batch``).

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
import resource
import statistics
import sys
import time
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import detectron2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import rev_det  # noqa: E402
from rev_det.modeling import RevViT, vit_trunk_args  # noqa: E402
from rev_det.utils import MemoryTracker, MiB, git_commit, machine, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = {
    name: os.path.join(ROOT, "configs", "COCO", f"mask_rcnn_{name}.yaml")
    for name in ("rev_vit_b", "rev_vit_l", "rev_vit_h", "rev_mvit_t", "rev_mvit_s", "rev_mvit_b")
}
SECTIONS = ("depth", "resolution", "detection", "classification", "speed")
MODES = ("autograd", "checkpoint", "reversible")
# Classification trunks at 224: (width, depth, heads). The paper's per-image memory in MB,
# plain -> reversible (its Table of ImageNet memory; ViT-Ti is not in the paper).
CLASSIFIERS = {
    "vit_ti": (192, 12, 3),
    "vit_s": (384, 12, 6),
    "vit_b": (768, 12, 12),
    "vit_l": (1024, 24, 16),
}
PAPER_MB_PER_IMAGE = {"vit_s": (66.5, 8.8), "vit_b": (129.7, 17.0), "vit_l": (349.3, 22.6)}
GiB = 1024 * MiB

Row = Dict[str, object]


# ---------------------------------------------------------------------------------------------
# Measuring


def measure(forward: Callable[[], torch.Tensor], params, device: str) -> Dict[str, float]:
    """Memory of one training step: ``forward()`` returns the loss, then it is back-propagated.

    Returns:
        MiB: ``peak`` (everything the step creates), ``grads`` (parameter gradients alive at the
        end), ``activations`` (peak of everything but parameter gradients; on CUDA peak minus
        gradients, an upper bound) and ``stored`` (alive between forward and backward).
    """
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = forward()
        torch.cuda.synchronize()
        stored = torch.cuda.memory_allocated() - base
        loss.backward()
        del loss
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        activations = peak - grads
    else:
        with MemoryTracker(grads_of=params) as mem:
            loss = forward()
            stored = mem.current
            loss.backward()
            del loss
        peak, grads, activations = mem.peak, mem.grads, mem.activation_peak
    for p in params:
        p.grad = None
    return {
        "peak": peak / MiB,
        "activations": activations / MiB,
        "grads": grads / MiB,
        "stored": stored / MiB,
    }


class MemoryBudget:
    """Skips measurements whose predicted tensor memory exceeds a limit.

    A series is one configuration measured along one variable (depth, pixel count or batch).
    Its next point is predicted by the straight line through its last two points (through the
    origin from a single point), from parameters + peak.

    Args:
        gib: the limit in GiB; None for no limit.
    """

    def __init__(self, gib: Optional[float]):
        self.limit = gib * GiB if gib else None
        self.series: Dict[Tuple, List[Tuple[float, float]]] = {}

    def predict(self, series: Tuple, x: float) -> Optional[float]:
        """Predicted bytes at ``x``, or None if the series has no point below ``x``."""
        pts = sorted(p for p in self.series.get(series, []) if p[0] < x)
        if not pts:
            return None
        if len(pts) == 1:
            return pts[0][1] * x / pts[0][0]
        (x0, m0), (x1, m1) = pts[-2:]
        return m1 + (m1 - m0) / (x1 - x0) * (x - x1)

    def over(self, points: Sequence[Tuple[Tuple, float]]) -> List[Tuple[Tuple, float]]:
        """The predictions ``(series, bytes)`` at the ``(series, x)`` points if any exceeds the
        limit (a point may belong to several series), else an empty list."""
        predictions = [(s, self.predict(s, x)) for s, x in points]
        predictions = [(s, p) for s, p in predictions if p is not None]
        if self.limit is None or all(p <= self.limit for _, p in predictions):
            return []
        return predictions

    def record(self, points: Sequence[Tuple[Tuple, float]], nbytes: float):
        for series, x in points:
            self.series.setdefault(series, []).append((x, nbytes))


def budgeted(budget, points, params_mib, what, run) -> Row:
    """``run()`` (a dict of MiB) unless the budget predicts too much; then a skipped row with
    the prediction along the first of ``points``' series that has one."""
    predictions = budget.over(points)
    if predictions:
        series, predicted = predictions[0]
        print(f"  skipped {what}: predicted {predicted / GiB:.1f} GiB > budget", flush=True)
        return {
            "measured": False,
            "predicted_peak": predicted / MiB - params_mib,
            "predicted_along": series[0],
        }
    mem = run()
    budget.record(points, (params_mib + mem["peak"]) * MiB)
    return {"measured": True, **mem}


def param_mib(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / MiB


# ---------------------------------------------------------------------------------------------
# Mask R-CNN


def synthetic_batch(
    size: int, batch: int, num_classes: int, device: str, objects: int = 3
) -> List[dict]:
    """Images with ``objects`` boxes and masks each, so that every head produces losses.

    With 3 objects (the memory sections) the mask head trains on however many sampled
    proposals overlap them, which depends on the model's weights. The speed section gives every
    image as many objects as the ROI heads sample foreground proposals at most
    (:func:`saturating_objects`): ground-truth boxes count as proposals, so the mask head then
    always sees that maximum, and detectors differ only in their backbones' work.
    """
    g = torch.Generator().manual_seed(0)
    out = []
    # 3 fixed boxes, then random ones of 5-40% of the side.
    fixed = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0.2, 0.5, 0.4, 0.9]])
    for _ in range(batch):
        inst = Instances((size, size))
        corner = torch.rand(max(objects - 3, 0), 2, generator=g) * 0.6
        side = 0.05 + torch.rand(max(objects - 3, 0), 2, generator=g) * 0.35
        boxes = torch.cat([fixed, torch.cat([corner, corner + side], dim=1)])[:objects]
        inst.gt_boxes = Boxes(boxes * size)
        inst.gt_classes = torch.randint(0, num_classes, (objects,), generator=g)
        masks = torch.zeros(objects, size, size, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, (boxes * size).long().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": image.to(device), "instances": inst.to(device)})
    return out


def saturating_objects(cfg) -> int:
    """Objects per image that make every detector's ROI heads sample the most foreground
    proposals they can (``BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION``; see
    :func:`synthetic_batch`)."""
    heads = cfg.MODEL.ROI_HEADS
    return int(heads.BATCH_SIZE_PER_IMAGE * heads.POSITIVE_FRACTION)


def detection_forward(model, batch, amp: bool):
    def forward():
        with EventStorage(), torch.autocast(model.device.type, torch.bfloat16, enabled=amp):
            losses = model(batch)
        return sum(losses.values())

    return forward


def backbone_forward(backbone, images, amp: bool):
    def forward():
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            features = backbone(images)
        return sum(f.float().mean() for f in features.values())

    return forward


def global_every(depth: int, window_block_indexes: Sequence[int]) -> int:
    """Spacing of the global-attention blocks of a RevViT config (every k-th block is global)."""
    return max(1, depth // max(1, depth - len(window_block_indexes)))


class Detection:
    """Mask R-CNN training steps of one backbone; the sections share measurements and budget.

    Args:
        args: the parsed command line.
        budget: the :class:`MemoryBudget` of the run.
    """

    def __init__(self, args, budget: MemoryBudget):
        self.args = args
        self.budget = budget
        self.vit = args.backbone.startswith("rev_vit")
        self.baseline = "simple" if self.vit else "fpn"
        self.pairs = [
            ("autograd", self.baseline),
            ("checkpoint", self.baseline),
            ("autograd", "reversible"),
            ("checkpoint", "reversible"),
            ("reversible", "reversible"),
        ]
        cfg = self.cfg("reversible", "reversible")
        self.depth = (cfg.MODEL.REVVIT if self.vit else cfg.MODEL.REVMVIT).DEPTH
        self._rows: Dict[Tuple, Row] = {}

    def runs(self) -> List[Tuple[str, str]]:
        """(backprop, pyramid) pairs of the detection and depth sections, baseline first."""
        return self._select(self.pairs)

    def main_runs(self) -> List[Tuple[str, str]]:
        """The baseline, checkpoint and reversible detectors (resolution and speed sections)."""
        return self._select([self.pairs[0], self.pairs[1], self.pairs[4]])

    def _select(self, pairs: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """``pairs`` restricted to ``--pairs`` (all without it)."""
        if not self.args.pairs:
            return pairs
        chosen = [tuple(p.split("/")) for p in self.args.pairs]
        unknown = [f"{b}/{p}" for b, p in chosen if (b, p) not in self.pairs]
        if unknown:
            raise SystemExit(
                f"--pairs {' '.join(unknown)}: not a (backprop/pyramid) pair measured for "
                f"{self.args.backbone}; choose from {' '.join(f'{b}/{p}' for b, p in self.pairs)}"
            )
        return [p for p in pairs if p in chosen]

    def cfg(self, backprop: str, pyramid: str, depth: Optional[int] = None):
        cfg = get_cfg()
        rev_det.add_revdet_config(cfg)
        cfg.merge_from_file(BACKBONES[self.args.backbone])
        cfg.merge_from_list(self.args.opts)
        cfg.MODEL.DEVICE = self.args.device
        cfg.MODEL.REV.BACKPROP = backprop
        cfg.MODEL.REV.PYRAMID = pyramid
        if depth is not None:
            if not self.vit:
                raise SystemExit("--depth-scope step is implemented for RevViT detectors only.")
            c = cfg.MODEL.REVVIT
            every = global_every(c.DEPTH, c.WINDOW_BLOCK_INDEXES)
            c.WINDOW_BLOCK_INDEXES = [i for i in range(depth) if i % every != every - 1]
            c.DEPTH = depth
        return cfg

    def step(self, backprop: str, pyramid: str, size: int, depth: int, backbone: bool) -> Row:
        """Full-step memory (and with ``backbone`` the backbone alone's) of one detector.

        A detector measured before (by another section) is not measured again.
        """
        key = (backprop, pyramid, size, depth)
        row = self._rows.get(key)
        if row is not None and not (backbone and row["measured"] and "backbone_peak" not in row):
            return row
        cfg = self.cfg(backprop, pyramid, depth if depth != self.depth else None)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        data = synthetic_batch(
            size, self.args.batch, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.DEVICE
        )
        what = f"{backprop}/{pyramid} at {size}, depth {depth}"
        if row is None:
            row = dict(backprop=backprop, pyramid=pyramid, size=size, depth=depth)
            row["params"] = param_mib(model)
            # Depth first: along depth the prediction of stored activations is exact.
            points = [(("depth", backprop, pyramid, size), depth)]
            points.append((("size", backprop, pyramid, depth), size * size))
            forward = detection_forward(model, data, self.args.amp)
            run = partial(measure, forward, model.parameters(), self.args.device)
            full = budgeted(self.budget, points, row["params"], what, run)
            row["measured"] = full.pop("measured")
            row["predicted_along"] = full.pop("predicted_along", None)
            row.update({f"step_{k}": v for k, v in full.items()})
            if row["measured"]:
                print(f"  {what}: step peak {row['step_peak']:9.1f} MiB", flush=True)
            self._rows[key] = row
        if backbone and row["measured"]:
            images = model.preprocess_image(data).tensor
            forward = backbone_forward(model.backbone, images, self.args.amp)
            mem = measure(forward, model.backbone.parameters(), self.args.device)
            row.update({f"backbone_{k}": v for k, v in mem.items()})
        return row


def run_detection(args, results, det: Detection):
    backbone = not args.step_only
    rows = [det.step(b, p, args.size, det.depth, backbone) for b, p in det.runs()]
    base = next((r for r in rows if (r["backprop"], r["pyramid"]) == det.pairs[0]), None)
    for r in rows:
        if base is not None:
            r["vs_baseline"] = _peak(base) / _peak(r)
            r["vs_predicted"] = not (base["measured"] and r["measured"])
    results["detection"] = rows


def run_resolution(args, results, det: Detection):
    rows = []
    for backprop, pyramid in det.main_runs():
        for size in sorted(args.sizes):
            rows.append(det.step(backprop, pyramid, size, det.depth, backbone=False))
    results["resolution"] = rows


# ---------------------------------------------------------------------------------------------
# Depth


def trunk_model(det: Detection, depth: int, backprop: str) -> RevViT:
    """A RevViT trunk of the configured width and attention layout, with ``depth`` blocks."""
    c = det.cfg(backprop, "reversible").MODEL.REVVIT
    every = global_every(c.DEPTH, c.WINDOW_BLOCK_INDEXES)
    return RevViT(
        img_size=det.args.size,
        embed_dim=c.EMBED_DIM,
        depth=depth,
        num_heads=c.NUM_HEADS,
        use_rel_pos=c.USE_REL_POS,
        window_size=c.WINDOW_SIZE,
        window_block_indexes=[i for i in range(depth) if i % every != every - 1],
        pretrain_img_size=c.PRETRAIN_IMG_SIZE,
        backprop=backprop,
    ).to(det.args.device)


def run_depth(args, results, det: Detection):
    if not det.vit:
        raise SystemExit("--sections depth is implemented for RevViT backbones only.")
    rows = []
    if args.depth_scope == "step":
        for backprop, pyramid in det.runs():
            for depth in sorted(args.depths):
                row = dict(det.step(backprop, pyramid, args.size, depth, backbone=False))
                # The depth table's columns are the step's.
                for key in ("peak", "predicted_peak", "activations", "stored"):
                    row[key] = row.get(f"step_{key}")
                rows.append(row)
    else:
        for mode in MODES:
            for depth in sorted(args.depths):
                torch.manual_seed(0)
                model = trunk_model(det, depth, mode).train()
                images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
                row = dict(backprop=mode, pyramid="none", depth=depth, params=param_mib(model))
                forward = backbone_forward(model, images, args.amp)
                run = partial(measure, forward, model.parameters(), args.device)
                points = [(("trunk", mode, args.size), depth)]
                what = f"trunk {mode} depth {depth}"
                row.update(budgeted(det.budget, points, row["params"], what, run))
                if row["measured"]:
                    print(f"  trunk {mode:10s} depth {depth:3d}: {row['activations']:9.1f} MiB")
                rows.append(row)
    results["depth"] = rows


def depth_fits(rows: List[Row], key: str, target_depth: int) -> List[str]:
    """Per series: slope per block between consecutive depths and the line to ``target_depth``."""
    notes = []
    for series in _series(rows, ("backprop", "pyramid")):
        pts = [(r["depth"], r[key]) for r in series if r["measured"]]
        if len(pts) < 2:
            continue
        slopes = [(m1 - m0) / (d1 - d0) for (d0, m0), (d1, m1) in zip(pts, pts[1:])]
        (d0, m0), (d1, m1) = pts[0], pts[-1]
        text = (
            f"{_label(series[0])}: {', '.join(f'{s:.2f}' for s in slopes)} MiB per block between "
            f"consecutive depths; depth {d1} / depth {d0} = {m1 / m0:.3f}x"
        )
        if target_depth > d1:
            line = pts[-1][1] + slopes[-1] * (target_depth - d1)
            text += (
                f"; the line through the last two reaches {line:.1f} MiB at depth {target_depth}"
            )
        notes.append(text)
    return notes


# ---------------------------------------------------------------------------------------------
# Classification (the paper's setting)


class Classifier(nn.Module):
    """A RevViT trunk at 224 with global average pooling and a linear head (the paper's setting).

    Args:
        embed_dim: width of each stream.
        depth: number of reversible blocks (all global attention).
        heads: attention heads.
        backprop: "autograd", "checkpoint" or "reversible".
        num_classes: outputs of the linear head.
    """

    def __init__(self, embed_dim: int, depth: int, heads: int, backprop: str, num_classes=1000):
        super().__init__()
        self.net = RevViT(
            img_size=224,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=heads,
            drop_path_rate=0.1,
            pretrain_img_size=224,
            backprop=backprop,
        )
        self.head = nn.Linear(2 * embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)["last_feat"].mean(dim=(2, 3)))


def classification_forward(model, images, labels, amp: bool):
    def forward():
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            return nn.functional.cross_entropy(model(images), labels)

    return forward


def run_classification(args, results, det: Detection):
    rows = []
    for name in args.classifiers:
        for mode in MODES:
            torch.manual_seed(0)
            model = Classifier(*CLASSIFIERS[name], backprop=mode).to(args.device).train()
            for batch in sorted(args.cls_batches):
                images = torch.randn(batch, 3, 224, 224, device=args.device)
                labels = torch.randint(0, 1000, (batch,), device=args.device)
                row = dict(model=name, backprop=mode, batch=batch, params=param_mib(model))
                forward = classification_forward(model, images, labels, args.amp)
                run = partial(measure, forward, model.parameters(), args.device)
                points = [(("classification", name, mode), batch)]
                what = f"classification {name} {mode} batch {batch}"
                row.update(budgeted(det.budget, points, row["params"], what, run))
                if row["measured"]:
                    row["per_image"] = row["activations"] / batch
                    row["stored_per_image"] = row["stored"] / batch
                    print(
                        f"  {name} {mode:10s} batch {batch:3d}: {row['per_image']:7.2f} MiB/image"
                    )
                rows.append(row)
    results["classification"] = rows


def marginal_per_image(rows: List[Row]) -> Dict[Tuple[str, str], Tuple[float, float, int, int]]:
    """Per (model, backprop): the activation MiB added per image between the two largest
    measured batches, the intercept of that line (memory that does not grow with the batch)
    and the two batches."""
    out = {}
    for series in _series(rows, ("model", "backprop")):
        pts = [(r["batch"], r["activations"]) for r in series if r["measured"]]
        if len(pts) >= 2:
            (b0, m0), (b1, m1) = pts[-2:]
            slope = (m1 - m0) / (b1 - b0)
            out[(series[0]["model"], series[0]["backprop"])] = (slope, m1 - slope * b1, b0, b1)
    return out


# ---------------------------------------------------------------------------------------------
# Speed


def timed(step: Callable[[], None], device: str) -> float:
    """Seconds of one ``step()``: CUDA events on CUDA, the wall clock on CPU."""
    if device != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def largest_batch(fits: Callable[[int], bool], limit: int) -> Tuple[int, List[int]]:
    """The largest batch <= ``limit`` for which ``fits(batch)``: doubling, then bisection.

    Returns:
        The batch (0 if even 1 does not fit) and the doubling batches that fit (1, 2, 4, ...).
    """
    lo, hi, doubling = 0, 1, []
    while hi <= limit and fits(hi):
        doubling.append(hi)
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, doubling


def speed_runs(runs: List[Tuple[str, str]], device: str) -> List[Tuple[str, str, bool]]:
    """(backprop, pyramid, parallel backward) of the speed section: the main runs, and on CUDA
    the reversible one again with the parallel (two CUDA streams) backward."""
    speed = [(backprop, pyramid, False) for backprop, pyramid in runs]
    if device == "cuda":
        speed += [(b, p, True) for b, p in runs if b == "reversible"]
    return speed


class SpeedRun:
    """One detector of the speed section and its training step at a given batch.

    Args:
        label: the backprop column of the tables ("reversible (parallel)", ...).
        pyramid: the pyramid column.
        model: the Mask R-CNN, in train mode on the benchmark's device.
    """

    def __init__(self, label: str, pyramid: str, model: nn.Module, amp: bool):
        self.label, self.pyramid, self.model, self.amp = label, pyramid, model, amp

    def forward(self, data: List[dict]) -> Callable[[], torch.Tensor]:
        return detection_forward(self.model, data, self.amp)

    def step(self, data: List[dict]) -> Callable[[], None]:
        forward = self.forward(data)

        def step():
            self.model.zero_grad(set_to_none=True)
            forward().backward()

        return step


class _Checkpointed(nn.Module):
    """A block run through ``torch.utils.checkpoint``: its input is stored, the rest recomputed
    in backward (rev_det's "checkpoint" mode does the same per block)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return checkpoint(self.block, x, use_reentrant=False)


def vitdet_backbone(cfg, act_checkpoint: bool, size: int) -> Optional[nn.Module]:
    """Detectron2's own ViTDet backbone (``ViT`` + ``SimpleFeaturePyramid``, as its
    ``mask_rcnn_vitdet`` config builds them) with the trunk sizes of ``cfg.MODEL.REVVIT``; None
    on a Detectron2 without ViTDet (v0.6).

    With ``act_checkpoint`` every block runs through ``torch.utils.checkpoint``: ViTDet's
    ``use_act_checkpoint`` does the same through fairscale's wrapper (a dependency rev_det does
    not need; Detectron2 marks it "TODO: use torch.utils.checkpoint").
    """
    try:
        from detectron2.modeling import SimpleFeaturePyramid, ViT
    except ImportError:
        return None
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    net = ViT(norm_layer=partial(nn.LayerNorm, eps=1e-6), **vit_trunk_args(cfg))
    if act_checkpoint:
        net.blocks = nn.ModuleList(_Checkpointed(block) for block in net.blocks)
    return SimpleFeaturePyramid(
        net,
        in_feature="last_feat",
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        top_block=LastLevelMaxPool(),
        norm="LN",
        square_pad=size,
    )


def vitdet_runs(args, det: Detection) -> List["SpeedRun"]:
    """ViTDet-B Mask R-CNN with autograd and with activation checkpointing: rev_det's detector
    (same RPN and heads) with its backbone replaced by Detectron2's own; empty on Detectron2
    v0.6 (a line says so)."""
    if not det.vit:
        return []
    runs = []
    for backprop in ("autograd", "checkpoint"):
        torch.manual_seed(0)
        cfg = det.cfg("autograd", "simple")
        model = build_model(cfg)
        backbone = vitdet_backbone(cfg, backprop == "checkpoint", args.size)
        if backbone is None:
            print(f"  speed: ViTDet skipped (Detectron2 {detectron2.__version__} has no ViT)")
            return []
        model.backbone = backbone.to(model.device)
        runs.append(SpeedRun(backprop, "ViTDet (Detectron2)", model.train(), args.amp))
    return runs


def run_speed(args, results, det: Detection):
    """Step times of the main detectors at each of ``--speed-batches``, interleaved (one step of
    each detector in turn, ``--repeats`` times, after ``--warmup`` steps of each, the first of
    which measures the step's peak memory), so that a machine that slows down or speeds up during
    the run slows every detector alike; on CUDA also the largest batch of each."""
    cfg = det.cfg("reversible", "reversible")
    num_classes, objects = cfg.MODEL.ROI_HEADS.NUM_CLASSES, saturating_objects(cfg)
    runs = vitdet_runs(args, det) if args.vitdet else []
    for backprop, pyramid, parallel in speed_runs(det.main_runs(), args.device):
        torch.manual_seed(0)
        cfg = det.cfg(backprop, pyramid)
        cfg.MODEL.REV.PARALLEL_BACKWARD = parallel
        label = backprop + (" (parallel)" if parallel else "")
        runs.append(SpeedRun(label, pyramid, build_model(cfg).train(), args.amp))
    # Filled in as measured, so that an interrupted run reports the batches it finished.
    rows = results["speed"] = []
    for batch in args.speed_batches:
        data = synthetic_batch(args.size, batch, num_classes, args.device, objects)
        steps, peaks = [], []
        for run in runs:
            peaks.append(measure(run.forward(data), run.model.parameters(), args.device)["peak"])
            steps.append(run.step(data))
            for _ in range(args.warmup - 1):
                steps[-1]()
        times = [[] for _ in runs]
        for _ in range(args.repeats):
            for step, seconds in zip(steps, times):
                seconds.append(timed(step, args.device))
        first = statistics.median(times[0])
        for run, peak, seconds in zip(runs, peaks, times):
            median = statistics.median(seconds)
            rows.append(
                dict(
                    backprop=run.label,
                    pyramid=run.pyramid,
                    batch=batch,
                    step_s=median,
                    images_per_s=batch / median,
                    vs_first=median / first,
                    peak=peak,
                    times=seconds,
                )
            )
            print(
                f"  speed {run.label:21s} {run.pyramid:10s} batch {batch:3d}: {median:7.3f} s "
                f"({median / first:.2f}x), peak {peak:8.1f} MiB",
                flush=True,
            )
        del data, steps
    if args.device == "cuda" and args.max_batch > 0:
        largest = results["largest_batch"] = []
        for run in runs:
            largest.append(largest_row(args, run, num_classes, objects))


def largest_row(args, run: SpeedRun, num_classes: int, objects: int) -> Row:
    """The largest batch (at most ``--max-batch``) whose training step fits in the card's
    memory, and that step's peak memory."""
    peaks = {}

    def fits(batch):
        data = synthetic_batch(args.size, batch, num_classes, "cuda", objects)
        try:
            peaks[batch] = measure(run.forward(data), run.model.parameters(), "cuda")["peak"]
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del data
            run.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    best, _ = largest_batch(fits, args.max_batch)
    print(f"  largest batch {run.label:21s} {run.pyramid:10s}: {best}", flush=True)
    return dict(
        backprop=run.label,
        pyramid=run.pyramid,
        largest=best,
        peak=peaks.get(best),
        at_limit=best == args.max_batch,
    )


# ---------------------------------------------------------------------------------------------
# Report


def _series(rows: List[Row], keys: Sequence[str]) -> List[List[Row]]:
    """Rows grouped by the values of ``keys``, in order of first appearance."""
    groups: Dict[Tuple, List[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return list(groups.values())


def _label(row: Row) -> str:
    parts = [row.get("model"), row["backprop"], row.get("pyramid")]
    return " / ".join(str(p) for p in parts if p not in (None, "none"))


def _peak(row: Row) -> float:
    """A detection row's step peak, measured or (for a skipped run) predicted."""
    return row["step_peak"] if row["measured"] else row["step_predicted_peak"]


def _cell(row: Row, column: str) -> str:
    value = row.get(column)
    if value is None:
        # A skipped run has a prediction of its peak (only): "~X (predicted)".
        predicted = row.get(column.replace("peak", "predicted_peak"))
        return f"~{predicted:.1f} (predicted)" if predicted is not None else "skipped"
    if column == "vs_baseline":
        return f"{value:.2f}x" + (" (predicted)" if row["vs_predicted"] else "")
    if column == "vs_first":
        return f"{value:.2f}x"
    if column == "step_s":
        return f"{value:.3f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def table(rows: List[Row], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def section(title: str, rows: List[Row], columns: Sequence[str], notes: List[str]) -> List[str]:
    """A Markdown section: title, table and notes (one bullet each)."""
    return [f"## {title}", "", table(rows, columns), "", *[f"- {n}" for n in notes], ""]


def plot(rows: List[Row], x: str, y: str, series: Sequence[str], labels, path: str, log=""):
    """Save a line per series (rows grouped by the ``series`` keys) of measured points.

    Args:
        labels: the x and y axis labels.
        log: the axes ("x", "y" or "xy") on a log scale.

    Returns:
        The note that names the plot in the report.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for group in _series(rows, series):
        pts = sorted((r[x], r[y]) for r in group if r.get(y) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=_label(group[0]))
    if "x" in log:
        ax.set_xscale("log", base=2)
    if "y" in log:
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: `{os.path.basename(path)}`"


def report_detection(args, results) -> List[str]:
    rows = results["detection"]
    columns = ["backprop", "pyramid", "params", "step_peak", "step_activations", "step_grads"]
    columns += ["step_stored"]
    notes = []
    if any("backbone_peak" in r for r in rows):
        columns += ["backbone_peak", "backbone_activations"]
    if any("vs_baseline" in r for r in rows):
        columns += ["vs_baseline"]
        notes.append("vs_baseline: the baseline's step peak over this row's")
    along = sorted({r["predicted_along"] for r in rows if not r["measured"]})
    if along:
        notes.append(
            "predicted: not measured (over --budget-gib); the step peak on the straight line "
            "through the last two measured points (through the origin from one) of the same "
            f"detector along {' and '.join(along)}; along depth this is exact for stored "
            "activations (see the depth section's slopes per block)"
        )
    title = f"One Mask R-CNN training step at {args.size}x{args.size}"
    return section(title, rows, columns, notes)


def report_depth(args, results) -> List[str]:
    rows = results["depth"]
    trunk = args.depth_scope == "trunk"
    key = "activations" if trunk else "peak"
    notes = depth_fits(rows, key, results["model_depth"])
    ylabel = "trunk activations (MiB)" if trunk else "training-step peak (MiB)"
    path = os.path.join(args.out, "memory_vs_depth.png")
    notes.append(plot(rows, "depth", key, ("backprop", "pyramid"), ("depth", ylabel), path))
    scope = "RevViT trunk alone" if trunk else "full Mask R-CNN step"
    title = f"Memory against depth ({scope}, {args.size}x{args.size})"
    columns = ["backprop", "pyramid", "depth", "params", "peak", "activations", "stored"]
    return section(title, rows, columns, notes)


def report_resolution(args, results) -> List[str]:
    rows = results["resolution"]
    path = os.path.join(args.out, "memory_vs_resolution.png")
    labels = ("input size (pixels, square)", "training-step peak (MiB)")
    notes = [plot(rows, "size", "step_peak", ("backprop", "pyramid"), labels, path)]
    for size in sorted(args.sizes):
        at = {r["backprop"]: r for r in rows if r["size"] == size and r["measured"]}
        if "autograd" in at and "reversible" in at:
            ratio = at["autograd"]["step_peak"] / at["reversible"]["step_peak"]
            notes.append(f"{size}: reversible step peak {ratio:.2f}x lower than the baseline's")
    columns = ["backprop", "pyramid", "size", "step_peak", "step_activations", "step_stored"]
    return section("Training-step memory against resolution", rows, columns, notes)


def report_classification(args, results) -> List[str]:
    rows = results["classification"]
    marginal = marginal_per_image(rows)
    notes = []
    for name in args.classifiers:
        at = {(r["backprop"], r["batch"]): r for r in rows if r["model"] == name and r["measured"]}
        for batch in sorted(args.cls_batches):
            if ("autograd", batch) in at and ("reversible", batch) in at:
                a, r = at[("autograd", batch)]["per_image"], at[("reversible", batch)]["per_image"]
                notes.append(
                    f"{name}, batch {batch}: {a:.1f} -> {r:.1f} MiB per image, "
                    f"reversible {a / r:.2f}x lower than autograd"
                )
        if (name, "autograd") in marginal and (name, "reversible") in marginal:
            a, r = marginal[(name, "autograd")], marginal[(name, "reversible")]
            notes.append(
                f"{name}, marginal (per added image; batches {a[2]}->{a[3]} for autograd, "
                f"{r[2]}->{r[3]} for reversible): {a[0]:.1f} -> {r[0]:.1f} MiB, {a[0] / r[0]:.2f}x;"
                f" batch-independent part {a[1]:.1f} and {r[1]:.1f} MiB"
            )
        if name in PAPER_MB_PER_IMAGE:
            plain, rev = PAPER_MB_PER_IMAGE[name]
            notes.append(f"{name}, paper: {plain} -> {rev} MB per image, {plain / rev:.1f}x")
    path = os.path.join(args.out, "memory_per_image_vs_batch.png")
    labels = ("batch", "activations per image (MiB)")
    notes.append(plot(rows, "batch", "per_image", ("model", "backprop"), labels, path, log="xy"))
    columns = ["model", "backprop", "batch", "params", "peak", "activations", "stored"]
    columns += ["per_image", "stored_per_image"]
    return section("Classification at 224 (the paper's setting)", rows, columns, notes)


def report_speed(args, results) -> List[str]:
    rows = results["speed"]
    notes = [
        f"median of {args.repeats} steps per detector, interleaved, after {args.warmup} "
        "warm-up steps; vs_first = step time / the first row's at the same batch; peak = the "
        "first warm-up step's; every image has as many objects as the ROI heads sample "
        "foreground proposals at most, so that all detectors' heads do the same work"
    ]
    if len(args.speed_batches) > 1:
        path = os.path.join(args.out, "throughput_vs_batch.png")
        labels = ("batch", "training images / s")
        series = ("backprop", "pyramid")
        notes.append(plot(rows, "batch", "images_per_s", series, labels, path, log="x"))
    columns = ["backprop", "pyramid", "batch", "step_s", "images_per_s", "vs_first", "peak"]
    md = section(f"Speed at {args.size}x{args.size}", rows, columns, notes)
    if "largest_batch" in results:
        notes = [f"doubling, then bisection, up to --max-batch {args.max_batch}"]
        columns = ["backprop", "pyramid", "largest", "peak", "at_limit"]
        md += section("Largest batch that fits", results["largest_batch"], columns, notes)
    return md


def write_report(args, results) -> str:
    """Write results.md and results.json to ``args.out``; returns the Markdown."""
    os.makedirs(args.out, exist_ok=True)
    tracker = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "exact tensor tracker"
    md = [
        f"# Benchmark: {', '.join(n for n in SECTIONS if n in results)}",
        "",
        f"- machine: {results['machine']}",
        f"- torch {results['torch']}, detectron2 {results['detectron2']}, rev_det "
        f"{results['commit']}; {'bf16 autocast' if args.amp else 'fp32'}",
        f"- command: `{results['command']}`",
        f"- memory in MiB ({tracker}); peak = everything the step creates (activations, "
        "temporaries, parameter gradients); parameters are listed apart; optimizer state is not "
        "included; stored = alive between forward and backward",
        f"- process peak RSS {results['max_rss_gib']:.1f} GiB; {results['seconds'] / 60:.0f} min",
        "",
    ]
    if "interrupted" in results:
        md.insert(-1, f"- interrupted during the {results['interrupted']} section: partial results")
    reports = {
        "depth": report_depth,
        "resolution": report_resolution,
        "detection": report_detection,
        "classification": report_classification,
        "speed": report_speed,
    }
    if any(name in results for name in ("depth", "resolution", "detection", "speed")):
        md.insert(-1, f"- detector: {args.backbone} (batch {args.batch})")
    for name in SECTIONS:
        if name in results:
            md += reports[name](args, results)
    text = "\n".join(md)
    write_results(args.out, text, results)
    return text


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
        choices=SECTIONS,
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


def main(argv=None):
    args = parse_args(argv)
    results = {
        "machine": machine(),
        "torch": torch.__version__,
        # Main still calls itself 0.6; ViTDet's ViT tells the two apart.
        "detectron2": detectron2.__version__
        + (" (main)" if hasattr(detectron2.modeling, "ViT") else " (v0.6)"),
        "commit": git_commit(ROOT),
        "command": " ".join(
            ["python", "tools/benchmark.py"] + (argv if argv is not None else sys.argv[1:])
        ),
        "args": vars(args),
    }
    start = time.time()
    det = Detection(args, MemoryBudget(args.budget_gib))
    results["baseline_pyramid"], results["model_depth"] = det.baseline, det.depth
    runners = {
        "depth": run_depth,
        "resolution": run_resolution,
        "detection": run_detection,
        "classification": run_classification,
        "speed": run_speed,
    }
    for name in SECTIONS:
        if name in args.sections:
            print(f"[{name}]", flush=True)
            try:
                runners[name](args, results, det)
            except KeyboardInterrupt:
                # Stopped by a time limit (SIGINT): keep what the section has measured so far.
                results["interrupted"] = name
                report(args, results, start)
                raise
            # Written after every section, so that a long run keeps what it has measured.
            text = report(args, results, start)
    print(text)
    return results


def report(args, results, start: float) -> str:
    results["seconds"] = time.time() - start
    results["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    return write_report(args, results)


if __name__ == "__main__":
    main()
