"""The compared Mask R-CNN detectors: their configs (one per backprop mode and pyramid), their
synthetic inputs and training-step closures, and :class:`Detection`, the memory of their steps
that the sections of one run share."""

import os
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from torch import nn

from rev_det.config import add_revdet_config
from rev_det.modeling import RevMViT, RevViT, RevViTDet, build_detector, vit_trunk_args
from rev_det.modeling.rev_vitdet import REVERSIBLE_AT

from .measure import MemoryBudget, Row, budgeted, measure, param_mib

__all__ = [
    "BACKBONES",
    "MODES",
    "ROOT",
    "Detection",
    "backbone_forward",
    "detection_forward",
    "detector_cfg",
    "window_blocks_at",
    "saturating_objects",
    "synthetic_batch",
    "training_step",
]

# The rev_det checkout: its configs, and the commit a report names.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Detector name -> its yacs config.
BACKBONES = {
    name: os.path.join(ROOT, "configs", "COCO", f"mask_rcnn_{name}.yaml")
    for name in (
        "rev_vit_b",
        "rev_vit_l",
        "rev_vit_h",
        "rev_vitdet_b",
        "rev_vitdet_l",
        "rev_vitdet_h",
        "rev_mvit_t",
        "rev_mvit_s",
        "rev_mvit_b",
    )
}
# The backprop modes compared, in the order of every table: the stored baseline first.
MODES = ("autograd", "checkpoint", "reversible")


def window_blocks_at(depth: int, sized: dict) -> List[int]:
    """The window-attention blocks of a RevViT of ``depth`` blocks whose global blocks are spaced
    as in ``sized`` (:func:`~rev_det.modeling.vit_trunk_args`): every k-th block is global."""
    configured = sized["depth"]
    every = max(1, configured // max(1, configured - len(sized["window_block_indexes"])))
    return [i for i in range(depth) if i % every != every - 1]


def detector_cfg(
    backbone: str,
    backprop: str,
    pyramid: str,
    device: str,
    opts: Sequence[str] = (),
    depth: Optional[int] = None,
):
    """The config of the ``backbone`` detector (a key of :data:`BACKBONES`) with ``opts``
    (KEY VALUE ... overrides), the given backprop mode and pyramid, on ``device``.

    Args:
        depth: a RevViT depth other than the configured one; the global-attention blocks stay
            evenly spaced as in the configured model.
    """
    cfg = get_cfg()
    add_revdet_config(cfg)
    cfg.merge_from_file(BACKBONES[backbone])
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.REV.BACKPROP = backprop
    cfg.MODEL.REV.PYRAMID = pyramid
    if depth is not None:
        if not backbone.startswith("rev_vit"):
            raise SystemExit("--depth-scope step is implemented for RevViT detectors only.")
        # From the named size with the keys the config sets.
        cfg.MODEL.REVVIT.WINDOW_BLOCK_INDEXES = window_blocks_at(depth, vit_trunk_args(cfg))
        cfg.MODEL.REVVIT.DEPTH = depth
    return cfg


def synthetic_batch(
    size: int,
    batch: int,
    num_classes: int,
    device: str,
    objects: int = 3,
    mask_format: str = "polygon",
) -> List[dict]:
    """Images with ``objects`` boxes and masks each, so that every head produces losses.

    The masks are rectangles, in the config's ``INPUT.MASK_FORMAT``: "polygon" (Detectron2's
    default, COCO's) or "bitmask". The format matters for memory: Detectron2's ROI heads give
    every sampled proposal its ground truth's mask, which for bitmasks is a copy of the whole
    image's mask (512 proposals at 1024x1024: 512 MiB per image), for polygons a few numbers.

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
        corners = (boxes * size).long().tolist()
        if mask_format == "polygon":
            inst.gt_masks = PolygonMasks(
                [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in corners]
            )
        else:
            masks = torch.zeros(objects, size, size, dtype=torch.bool)
            for m, (x0, y0, x1, y1) in zip(masks, corners):
                m[y0:y1, x0:x1] = True
            inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": image.to(device), "instances": inst.to(device)})
    return out


def config_batch(cfg, size: int, batch: int, objects: int = 3) -> List[dict]:
    """:func:`synthetic_batch` for the detector of ``cfg``: its classes, device and mask format."""
    num_classes, device = cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.DEVICE
    return synthetic_batch(size, batch, num_classes, device, objects, cfg.INPUT.MASK_FORMAT)


def saturating_objects(cfg) -> int:
    """Objects per image that make every detector's ROI heads sample the most foreground
    proposals they can (``BATCH_SIZE_PER_IMAGE * POSITIVE_FRACTION``; see
    :func:`synthetic_batch`)."""
    heads = cfg.MODEL.ROI_HEADS
    return int(heads.BATCH_SIZE_PER_IMAGE * heads.POSITIVE_FRACTION)


def detection_forward(model, batch, amp: bool) -> Callable[[], torch.Tensor]:
    """The loss of ``model`` (a Detectron2 detector in train mode) on ``batch``, as a closure."""

    def forward():
        with EventStorage(), torch.autocast(model.device.type, torch.bfloat16, enabled=amp):
            losses = model(batch)
        return sum(losses.values())

    return forward


def backbone_forward(
    backbone, images, amp: bool, keep_features: bool = False
) -> Callable[[], torch.Tensor]:
    """A scalar of the features of ``backbone`` (or of a trunk alone) on ``images``, so that
    backward reaches every output: each feature map's mean, or with ``keep_features`` its mean
    square, which keeps the maps till backward as a detector's heads do (their first
    convolutions save their inputs for the weight gradients); a backbone that relies on that
    (the reversible pyramid inverts its levels from their outputs) is then measured as in a
    detector."""

    def forward():
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            features = backbone(images)
        if keep_features:
            return sum((f * f).float().mean() for f in features.values())
        return sum(f.float().mean() for f in features.values())

    return forward


def training_step(forward: Callable[[], torch.Tensor], model: nn.Module) -> Callable[[], None]:
    """One timed training step: the gradients of ``model`` reset, then ``forward()``'s loss
    back-propagated."""

    def step():
        model.zero_grad(set_to_none=True)
        forward().backward()

    return step


class Detection:
    """Mask R-CNN training steps of one backbone; the sections share measurements and budget.

    Args:
        options: the run's :class:`~rev_det.benchmark.BenchmarkOptions`.
        budget: the :class:`MemoryBudget` of the run.
    """

    def __init__(self, options, budget: MemoryBudget):
        self.options = options
        self.budget = budget
        self.vit = options.backbone.startswith("rev_vit")
        # RevViTDet, ViTDet's ViT as a surrogate, in ViTDet's pyramid (its main rows) or rev_det's
        # reversible one; its reversible rows are its reversible phase (the coupling at
        # REVERSIBLE_AT), its checkpoint rows the phase before.
        self.surrogate = options.backbone.startswith("rev_vitdet")
        self.baseline = "simple" if self.vit else "fpn"
        if self.surrogate:
            self.pairs = [
                ("autograd", "simple"),
                ("checkpoint", "simple"),
                ("checkpoint", "reversible"),
                ("reversible", "reversible"),
                ("reversible", "simple"),
            ]
        else:
            self.pairs = [
                ("autograd", self.baseline),
                ("checkpoint", self.baseline),
                ("autograd", "reversible"),
                ("checkpoint", "reversible"),
                ("reversible", "reversible"),
            ]
        cfg = self.cfg(*self.pairs[-1])
        trunk = RevViTDet if self.surrogate else RevViT if self.vit else RevMViT
        self.depth = trunk.from_config(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))["depth"]
        self._rows: Dict[Tuple, Row] = {}

    def runs(self) -> List[Tuple[str, str]]:
        """(backprop, pyramid) pairs of the detection and depth sections, baseline first."""
        return self._select(self.pairs)

    def main_runs(self) -> List[Tuple[str, str]]:
        """The baseline, checkpoint and reversible detectors (resolution and speed sections)."""
        return self._select([self.pairs[0], self.pairs[1], self.pairs[-1]])

    def _select(self, pairs: List[Tuple[str, str]]) -> List[Tuple[str, str]]:
        """``pairs`` restricted to ``--pairs`` (all without it)."""
        if not self.options.pairs:
            return pairs
        chosen = [tuple(p.split("/")) for p in self.options.pairs]
        unknown = [f"{b}/{p}" for b, p in chosen if (b, p) not in self.pairs]
        if unknown:
            raise SystemExit(
                f"--pairs {' '.join(unknown)}: not a (backprop/pyramid) pair measured for "
                f"{self.options.backbone}; choose from {' '.join(f'{b}/{p}' for b, p in self.pairs)}"
            )
        return [p for p in pairs if p in chosen]

    def cfg(self, backprop: str, pyramid: str, depth: Optional[int] = None):
        """The run's detector config (:func:`detector_cfg`) with this backprop and pyramid."""
        a = self.options
        opts = list(a.opts)
        if self.surrogate and backprop == "reversible":
            alpha, beta = REVERSIBLE_AT
            opts += ["MODEL.REV.COUPLING.ALPHA", (alpha, alpha), "MODEL.REV.COUPLING.BETA"]
            opts += [(beta, beta)]
        return detector_cfg(a.backbone, backprop, pyramid, a.device, opts, depth)

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
        model = build_detector(cfg).train()
        data = config_batch(cfg, size, self.options.batch)
        what = f"{backprop}/{pyramid} at {size}, depth {depth}"
        if row is None:
            row = dict(backprop=backprop, pyramid=pyramid, size=size, depth=depth)
            row["params"] = param_mib(model)
            # Depth first: along depth the prediction of stored activations is exact.
            points = [(("depth", backprop, pyramid, size), depth)]
            points.append((("size", backprop, pyramid, depth), size * size))
            forward = detection_forward(model, data, self.options.amp)
            run = partial(measure, forward, model.parameters(), self.options.device)
            full = budgeted(self.budget, points, row["params"], what, run)
            row["measured"] = full.pop("measured")
            row["predicted_along"] = full.pop("predicted_along", None)
            row.update({f"step_{k}": v for k, v in full.items()})
            if row["measured"]:
                print(f"  {what}: step peak {row['step_peak']:9.1f} MiB", flush=True)
            self._rows[key] = row
        if backbone and row["measured"]:
            images = model.preprocess_image(data).tensor
            forward = backbone_forward(model.backbone, images, self.options.amp, keep_features=True)
            mem = measure(forward, model.backbone.parameters(), self.options.device)
            row.update({f"backbone_{k}": v for k, v in mem.items()})
        return row
