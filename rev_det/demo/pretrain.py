"""Pretrain a detector's trunk on the shapes generator, as MAE or ImageNet pretrain a real one.

A detector that starts from a pretrained trunk is the recipe of every real one (ViTDet fine-tunes
an MAE trunk, the paper's RevMViT an ImageNet one). rev_det's miniature of it for the embedded
``revdet_shapes`` data trains the trunk on images drawn by the same generator (from its own
"pretrain" stream, never a dataset image) with two linear heads on its output::

    image (crop x crop) ──► trunk (the detector's, same module names) ──► (B, C, h, w), stride t
        ├─► dense: 1x1 conv to (K+1) (t/4)^2, depth-to-space ──► per 4x4 cell: background or
        │   one of the K shapes                              (cross entropy, padding ignored)
        └─► classify: features averaged over each object's visible cells (mask pooling)
            ──► linear ──► the object's shape                (cross entropy, one per object)

The heads are as weak as possible (linear), so that the trunk itself must learn what a star or a
hexagon looks like, and where it is; they are thrown away after pretraining. The trunk trains in
its configured backprop mode ("reversible": pretraining at reversible memory).

Everything a run does is a function of (seed, iteration): batch ``i`` holds stream images
``i * batch_size ...`` with per-image augmentation seeds and the iteration seeds torch's RNG
(drop path), so a resumed run (:func:`pretrain`, ``resume=True``) continues exactly as the
uninterrupted one would have.
"""

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import detection_utils
from detectron2.layers import FrozenBatchNorm2d
from detectron2.solver.build import get_default_optimizer_params
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import atomic_open, is_weight
from .shapes import MAX_OBJECTS, SHAPES_CATEGORIES, check_stream, draw_shapes_sample

__all__ = [
    "PretrainSchedule",
    "ShapesSegmentation",
    "ShapesPretrainHead",
    "build_head",
    "detector_trunk",
    "export_trunk",
    "pretrain",
    "trainable_norms",
]

logger = logging.getLogger(__name__)

IGNORE = -1  # label of padding cells
LABEL_STRIDE = 4  # one label per 4x4 pixel cell, the stride of p2
_STATE_FILE = "pretrain_last.pth"


class ShapesSegmentation(Dataset):
    """Images of the shapes generator's ``stream`` with a shape label per 4x4 pixel cell.

    Each image is resized (short side drawn from ``scales``), flipped at random and cropped or
    padded to ``crop x crop``; then converted and normalised exactly as Detectron2's
    ``GeneralizedRCNN`` sees its inputs (``input_format``, ``pixel_mean``, ``pixel_std``; padding
    is 0 after normalisation, as in ``ImageList``).

    Args:
        size: number of images (indices 0 .. size-1 of the stream).
        crop: side of the square training crop; a multiple of 4.
        pixel_mean, pixel_std: the detector's ``MODEL.PIXEL_MEAN`` / ``PIXEL_STD``.
        input_format: the detector's ``INPUT.FORMAT`` ("RGB", "BGR", ...).
        scales: short-side sizes to resize to, one drawn per image.
        stream: the generator's image stream (see :func:`draw_shapes_sample`).
        seed: base seed of the stream and of the augmentation.

    Items are dicts of tensors: ``image`` (3, crop, crop) float32; ``labels`` (crop/4, crop/4)
    int64 holding 0 for background, ``k`` for ``SHAPES_CATEGORIES[k - 1]`` and -1 for padding;
    ``instances`` (crop/4, crop/4) int64, the object (1-based) covering each cell, 0 for
    background, -1 for padding; ``classes`` (MAX_OBJECTS,) int64, the category id of each
    object, 0 where there is none (or it was cropped away).
    """

    def __init__(
        self,
        size: int,
        crop: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        input_format: str = "RGB",
        scales: Sequence[int] = (192, 224, 256),
        stream: str = "pretrain",
        seed: int = 0,
    ):
        if crop % LABEL_STRIDE:
            raise ValueError(f"crop {crop} must be a multiple of {LABEL_STRIDE}.")
        self.size = size
        self.crop = crop
        self.mean = torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1)
        self.input_format = input_format
        self.scales = tuple(scales)
        self.stream = stream
        self.seed = seed
        check_stream(stream)  # here, not in a data loader worker

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        image, objects = draw_shapes_sample(self.stream, index, self.seed)
        # One map holds both targets: object k (1-based, painting order) in the low byte's
        # range, so that resizing and cropping move categories and instances together.
        instances = np.zeros((image.height, image.width), dtype=np.uint8)
        classes = torch.zeros(MAX_OBJECTS, dtype=torch.int64)
        for k, obj in enumerate(objects, start=1):  # visible masks are disjoint
            instances[obj["mask"]] = k
            classes[k - 1] = obj["category_id"]

        rng = np.random.default_rng([self.seed, 1, index])  # augmentation, apart from drawing
        scale = int(rng.choice(self.scales)) / min(image.height, image.width)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.BILINEAR)
        instances = np.asarray(Image.fromarray(instances).resize(size, Image.NEAREST))
        pixels = detection_utils.convert_PIL_to_numpy(image, self.input_format)
        if rng.random() < 0.5:
            pixels, instances = pixels[:, ::-1], instances[:, ::-1]

        x = (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() - self.mean) / self.std
        y = torch.from_numpy(instances.astype(np.int64))
        out_x = torch.zeros(x.shape[0], self.crop, self.crop)
        out_y = torch.full((self.crop, self.crop), IGNORE, dtype=torch.int64)
        h, w = min(self.crop, x.shape[1]), min(self.crop, x.shape[2])
        top = int(rng.integers(x.shape[1] - h + 1))
        left = int(rng.integers(x.shape[2] - w + 1))
        out_x[:, :h, :w] = x[:, top : top + h, left : left + w]
        out_y[:h, :w] = y[top : top + h, left : left + w]
        # The target of a cell is that of its centre pixel: what the stride-4 map is centred on.
        centre = LABEL_STRIDE // 2
        cells = out_y[centre::LABEL_STRIDE, centre::LABEL_STRIDE]
        labels = torch.where(cells > 0, classes[(cells - 1).clamp(min=0)], cells)
        # An object cropped away entirely is no classification target.
        present = torch.zeros(MAX_OBJECTS + 1, dtype=torch.bool)
        present[cells[cells > 0]] = True
        classes = torch.where(present[1:], classes, torch.zeros_like(classes))
        return {"image": out_x, "labels": labels, "instances": cells, "classes": classes}


class ShapesPretrainHead(nn.Module):
    """The two pretraining heads on a trunk's (B, C, h, w) feature map, both linear.

    * ``dense``: a 1x1 conv to ``(K + 1) r^2`` channels and a depth-to-space by ``r`` (a linear
      "transposed conv" with kernel = stride = r): per 4x4 cell, background or one of the K
      shapes, from the trunk feature above it. It teaches where objects are and where they end.
    * ``classify``: per object, the trunk features averaged over the object's visible cells
      (mask pooling: the region a box head pools, without the box) and a linear layer to the K
      shapes. It teaches what each object is, one loss term per object, however small; in the
      dense loss small objects are a few cells against hundreds of background ones.

    Args:
        in_channels: channels C of the trunk's feature.
        num_classes: K, the shapes.
        upsample: r, the trunk's stride over the label stride.
    """

    def __init__(self, in_channels: int, num_classes: int, upsample: int):
        super().__init__()
        self.upsample = upsample
        self.dense = nn.Sequential(
            nn.Conv2d(in_channels, (num_classes + 1) * upsample * upsample, 1),
            nn.PixelShuffle(upsample),
        )
        self.classify = nn.Linear(in_channels, num_classes)

    def forward(
        self, x: torch.Tensor, instances: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense logits (B, K + 1, h r, w r) and object logits (B, MAX_OBJECTS, K).

        Args:
            x: trunk features (B, C, h, w).
            instances: (B, h r, w r) object index per cell (1-based; 0 background, -1 padding).
        """
        one_hot = F.one_hot(instances.clamp(min=0), MAX_OBJECTS + 1)[..., 1:]
        # Fraction of each trunk cell that each object covers: (B, MAX_OBJECTS, h, w).
        cover = F.avg_pool2d(one_hot.permute(0, 3, 1, 2).to(x.dtype), self.upsample)
        pooled = torch.einsum("bkhw,bchw->bkc", cover, x)
        pooled = pooled / cover.sum((2, 3)).clamp(min=1e-6).unsqueeze(-1)
        return self.dense(x), self.classify(pooled)


def detector_trunk(backbone: nn.Module) -> Tuple[str, nn.Module]:
    """The trunk of a rev_det (or Detectron2 FPN) backbone and its name in the detector.

    Returns ``("backbone.net", trunk)`` for rev_det's pyramids, ``("backbone.bottom_up",
    trunk)`` for Detectron2's FPN: the prefixes that ``MODEL.REV.STRICT_LOAD`` requires.
    """
    for attr in ("net", "bottom_up"):
        trunk = getattr(backbone, attr, None)
        if isinstance(trunk, nn.Module):
            return f"backbone.{attr}", trunk
    raise TypeError(
        f"{type(backbone).__name__} has neither a 'net' (rev_det's pyramids) nor a 'bottom_up' "
        "(Detectron2's FPN) trunk to pretrain; use a config with a rev_det backbone."
    )


def trainable_norms(module: nn.Module) -> nn.Module:
    """Replace every ``FrozenBatchNorm2d`` in ``module`` by a ``BatchNorm2d`` of the same size.

    A detector freezes the batch norms of its pretrained trunk (as Detectron2 freezes a pretrained
    ResNet's), but a trunk pretrained from scratch must learn them. The names and tensors are the
    same, so the pretrained weights load back into the frozen layers. Returns ``module``, or the
    replacement if ``module`` itself is frozen.
    """
    if isinstance(module, FrozenBatchNorm2d):
        return nn.BatchNorm2d(module.num_features, eps=module.eps)
    for name, child in module.named_children():
        setattr(module, name, trainable_norms(child))
    return module


def _deepest_feature(trunk: nn.Module) -> Tuple[str, int, int]:
    """(name, channels, stride) of the trunk's coarsest output."""
    name, spec = max(trunk.output_shape().items(), key=lambda kv: kv[1].stride)
    if spec.stride % LABEL_STRIDE:
        raise ValueError(f"the trunk's stride {spec.stride} is not a multiple of {LABEL_STRIDE}.")
    return name, spec.channels, spec.stride


def build_head(trunk: nn.Module) -> ShapesPretrainHead:
    """The pretraining heads for ``trunk``'s coarsest output."""
    _, channels, stride = _deepest_feature(trunk)
    return ShapesPretrainHead(channels, len(SHAPES_CATEGORIES), stride // LABEL_STRIDE)


@dataclass
class PretrainSchedule:
    """What a pretraining run does; a resumed run must use the same (checked on resume).

    Attributes:
        iterations: optimizer steps.
        batch_size: images per step.
        lr: peak AdamW learning rate (linear warm-up, then cosine decay to 0).
        warmup: warm-up steps.
        weight_decay: AdamW weight decay (0 for norms, biases and position tables).
        crop: side of the square training crop.
        seed: seed of the image stream, augmentation and per-iteration RNG.
    """

    iterations: int = 1500
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    crop: int = 256
    seed: int = 0

    def __post_init__(self):
        for key in ("iterations", "batch_size", "crop"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}.")
        if self.warmup < 0 or self.lr <= 0:
            raise ValueError(f"warmup must be >= 0 and lr > 0, got {self.warmup}, {self.lr}.")

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.iterations - self.warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _optimizer(trunk: nn.Module, head: nn.Module, schedule: PretrainSchedule):
    no_decay = {"pos_embed": {"weight_decay": 0.0}}
    no_decay.update({k: {"weight_decay": 0.0} for k in ("rel_pos_h", "rel_pos_w")})
    params = get_default_optimizer_params(
        nn.ModuleDict({"trunk": trunk, "head": head}),
        base_lr=schedule.lr,
        weight_decay=schedule.weight_decay,
        weight_decay_norm=0.0,
        weight_decay_bias=0.0,
        overrides=no_decay,
    )
    return torch.optim.AdamW(params, lr=schedule.lr, weight_decay=schedule.weight_decay)


def _seed_iteration(seed: int, iteration: int) -> None:
    torch.manual_seed(int(np.random.SeedSequence((seed, iteration)).generate_state(1)[0]))


def _losses(head, features, batch) -> Tuple[torch.Tensor, int, int]:
    """The summed dense and object losses, and (correct, total) object classifications."""
    dense, objects = head(features, batch["instances"])
    loss = F.cross_entropy(dense, batch["labels"], ignore_index=IGNORE)
    present = batch["classes"] > 0
    if present.any():
        target = batch["classes"][present] - 1
        logits = objects[present]
        loss = loss + F.cross_entropy(logits, target)
        return loss, int((logits.argmax(1) == target).sum()), int(present.sum())
    return loss, 0, 0


def _load_weights(path: str, trunk: nn.Module, head: nn.Module) -> dict:
    """Load a run state's trunk and head weights; the whole state is returned."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk.load_state_dict(state["trunk"])
    head.load_state_dict(state["head"])
    return state


def pretrain(
    trunk: nn.Module,
    dataset: ShapesSegmentation,
    schedule: PretrainSchedule,
    output_dir: str,
    resume: bool = False,
    checkpoint_period: int = 100,
    log_period: int = 20,
    num_workers: int = 1,
    head: Optional[nn.Module] = None,
    init: Optional[str] = None,
) -> Dict[str, float]:
    """Train ``trunk`` (and a dense head) on ``dataset``; state in ``output_dir``.

    Every ``checkpoint_period`` steps and at the end the trunk, head, optimizer and step are
    written atomically to ``output_dir/pretrain_last.pth``; ``resume=True`` continues from it
    (the schedule must equal the saved one). ``init``, the ``pretrain_last.pth`` of an earlier
    run, makes a new run a further stage of that one: it starts from that run's trunk and head
    weights, with a fresh optimizer and its own ``schedule`` (a resumed run ignores it: its
    state already holds those weights). Progress is logged every ``log_period`` steps with
    the running loss, the accuracy of the object classification and the remaining time.

    Returns:
        The last logging window's ``loss`` and object ``accuracy``, and the run's ``seconds``.
    """
    if len(dataset) < schedule.iterations * schedule.batch_size:
        raise ValueError(
            f"the dataset has {len(dataset)} images; {schedule.iterations} steps of "
            f"{schedule.batch_size} need {schedule.iterations * schedule.batch_size}."
        )
    os.makedirs(output_dir, exist_ok=True)
    head = build_head(trunk) if head is None else head
    feature = _deepest_feature(trunk)[0]
    optimizer = _optimizer(trunk, head, schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.lr_factor)
    state_path = os.path.join(output_dir, _STATE_FILE)
    start = 0
    if resume and os.path.isfile(state_path):
        state = _load_weights(state_path, trunk, head)
        if state["schedule"] != asdict(schedule):
            raise ValueError(
                f"{state_path} was written by a run with schedule {state['schedule']}, not "
                f"{asdict(schedule)}: resume with the same settings, or use another output "
                "directory."
            )
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["iteration"]
        logger.info("Resuming pretraining from step %d of %s", start, state_path)
    elif os.path.isfile(state_path):
        raise FileExistsError(
            f"{state_path} exists: pass resume=True (--resume) to continue that run, or use "
            "another output directory."
        )
    elif init is not None:
        state = _load_weights(init, trunk, head)
        logger.info(
            "Starting from the trunk and head of %s (a run with schedule %s, at step %d)",
            init,
            state["schedule"],
            state["iteration"],
        )

    def save(step: int):
        state = {
            "trunk": trunk.state_dict(),
            "head": head.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "iteration": step,
            "schedule": asdict(schedule),
        }
        with atomic_open(state_path) as f:
            torch.save(state, f)

    indices = range(start * schedule.batch_size, schedule.iterations * schedule.batch_size)
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=schedule.batch_size,
        num_workers=num_workers,
        drop_last=True,
    )
    trunk.train()
    head.train()
    window = {"loss": 0.0, "correct": 0, "total": 0, "steps": 0}
    result = {"loss": float("nan"), "accuracy": float("nan")}
    began = time.perf_counter()
    for step, batch in enumerate(loader, start=start):
        _seed_iteration(schedule.seed, step)
        loss, correct, total = _losses(head, trunk(batch["image"])[feature], batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"pretraining loss is {loss.item()} at step {step}; lower the learning rate "
                f"(now {schedule.lr})."
            )
        window["loss"] += loss.item()
        window["correct"] += correct
        window["total"] += total
        window["steps"] += 1
        done = step + 1
        if done % log_period == 0 or done == schedule.iterations:
            elapsed = time.perf_counter() - began
            eta = elapsed / (done - start) * (schedule.iterations - done)
            result = {
                "loss": window["loss"] / window["steps"],
                "accuracy": window["correct"] / max(window["total"], 1),
            }
            logger.info(
                "pretrain step %d/%d  loss %.4f  object accuracy %.3f  lr %.2e  "
                "%.2f s/step  eta %s",
                done,
                schedule.iterations,
                result["loss"],
                result["accuracy"],
                scheduler.get_last_lr()[0],
                elapsed / (done - start),
                time.strftime("%H:%M:%S", time.gmtime(eta)),
            )
            window = {"loss": 0.0, "correct": 0, "total": 0, "steps": 0}
        if done % checkpoint_period == 0 or done == schedule.iterations:
            save(done)
    result["seconds"] = time.perf_counter() - began
    return result


def export_trunk(
    trunk: nn.Module, path: str, prefix: str, half: bool = False, provenance: Optional[dict] = None
) -> None:
    """Write ``trunk``'s weights as a Detectron2 checkpoint under the detector's names.

    The file is ``{"model": {prefix + "." + name: tensor}, "rev_det": provenance}``, which
    ``MODEL.WEIGHTS`` / ``train.init_checkpoint`` load (with ``MODEL.REV.STRICT_LOAD`` every trunk
    weight is then required). ``half`` stores float16 (half the size; loaded into a float32
    model the weights are exact float16 values).
    """
    weights = {
        f"{prefix}.{name}": (t.half() if half and t.is_floating_point() else t).clone()
        for name, t in trunk.state_dict().items()
        if is_weight(name)
    }
    with atomic_open(path) as f:
        torch.save({"model": weights, "rev_det": provenance or {}}, f)
