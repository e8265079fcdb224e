"""Checks of what a user hands to training: configs, data, weight files and the output directory.

Both entry points (``projects/train_net.py`` for yacs configs and
``projects/lazyconfig_train_net.py`` for LazyConfigs) run these, so that a bad input ends in an
error that names the setting or file and the fix, before training starts where that can be
known then, or in a warning with a count, never in silence. The setting names in messages are
those of the config system in use (:data:`YACS` or :data:`LAZY`).

* Configs: :func:`check_yacs_config`, :func:`check_lazy_config` (trunk depth, windows larger
  than the token grid of the largest image, reconstruction-check period, learning rate, number
  of classes, ``MODEL.WEIGHTS``) and :func:`check_lazy_overrides` (an override must name an
  existing key; the error names the closest one).
* Data: :func:`scan_annotations` (negative-size boxes are an error; boxes Detectron2 would drop
  are counted in a warning), :func:`check_num_classes` (categories against the classifier),
  :class:`CheckedMapper` (unreadable and 16-bit image files are named).
* Files: :func:`checkpoint_file_problem` (why a file is not a checkpoint).
* Output directory: :class:`OutputDirLock` (one run at a time; stale locks of crashed runs are
  taken over; temporary files of interrupted saves are removed).
* Divergence: :func:`divergence_advice` (a non-finite loss or box names the iteration and what
  to change).
"""

import contextlib
import dataclasses
import datetime
import difflib
import errno
import fcntl
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import zipfile
from collections import Counter
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from detectron2.layers import ShapeSpec
from detectron2.structures import BoxMode

__all__ = [
    "LAZY",
    "YACS",
    "AnnotationSummary",
    "CheckedMapper",
    "OutputDirInUseError",
    "OutputDirLock",
    "SettingNames",
    "check_lazy_config",
    "check_lazy_overrides",
    "check_no_flags_in_overrides",
    "check_num_classes",
    "check_weights_file",
    "check_yacs_config",
    "checkpoint_file_problem",
    "complete_lazy_config",
    "divergence_advice",
    "explain_write_error",
    "largest_image_side",
    "scan_annotations",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SettingNames:
    """How the settings that messages name are spelled in one config system."""

    output_dir: str
    weights: str
    num_classes: str
    base_lr: str
    warmup: str
    check_period: str
    check_threshold: str
    square_pad: str
    image_sizes: str


YACS = SettingNames(
    output_dir="OUTPUT_DIR",
    weights="MODEL.WEIGHTS",
    num_classes="MODEL.ROI_HEADS.NUM_CLASSES",
    base_lr="SOLVER.BASE_LR",
    warmup="SOLVER.WARMUP_ITERS",
    check_period="MODEL.REV.CHECK_RECONSTRUCTION.PERIOD",
    check_threshold="MODEL.REV.CHECK_RECONSTRUCTION.THRESHOLD",
    square_pad="MODEL.REV.SQUARE_PAD",
    image_sizes="INPUT.MAX_SIZE_TRAIN / INPUT.MAX_SIZE_TEST",
)
LAZY = SettingNames(
    output_dir="train.output_dir",
    weights="train.init_checkpoint",
    num_classes="model.roi_heads.num_classes",
    base_lr="optimizer.lr",
    warmup="lr_multiplier.warmup_length",
    check_period="train.check_reconstruction.period",
    check_threshold="train.check_reconstruction.threshold",
    square_pad="model.backbone.square_pad",
    image_sizes="dataloader.train/test.mapper.augmentations",
)

# rev_det's backbones pad images to a multiple of their size divisibility, at most 64 (the p6
# stride of RevViT's pyramids), so the token grid can exceed the largest image by that much.
_MAX_PADDING = 64


# ------------------------------------------------------------------------------------- configs


def _check_trunk(kind: str, get: Callable[[str], Any], name: Callable[[str], str], side, sizes):
    """Check a RevViT / RevMViT trunk's arguments; ``get(arg)`` reads one, ``name(arg)`` names
    its setting; ``side`` is the largest image side (None: unknown), ``sizes`` the setting that
    bounds it."""
    depth = get("depth")
    # RevMViT has four stages of at least one block each.
    minimum = 1 if kind == "RevViT" else 4
    if not isinstance(depth, int) or depth < minimum:
        raise ValueError(
            f"{name('depth')} = {depth!r}: a {kind} trunk needs at least {minimum} block"
            f"{'s' if minimum > 1 else ''}; set it to the number of blocks (e.g. 12 for ViT-B)."
        )
    embed_dim, num_heads = get("embed_dim"), get("num_heads")
    if isinstance(embed_dim, int) and isinstance(num_heads, int) and num_heads > 0:
        if embed_dim % num_heads:
            raise ValueError(
                f"{name('embed_dim')} = {embed_dim} is not divisible by {name('num_heads')} = "
                f"{num_heads}: each head takes embed_dim / num_heads channels; choose a width "
                "that is a multiple of the heads (ViT-B: 768 and 12)."
            )
    if kind == "RevViT":
        window, stride = get("window_size"), get("patch_size")
        indexes = list(get("window_block_indexes") or ())
        bad = [i for i in indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(
                f"{name('window_block_indexes')} lists blocks {bad}, outside the {depth} blocks "
                f"(0..{depth - 1}) of {name('depth')} = {depth}; list only indexes below the "
                "depth, or raise it."
            )
        if indexes and not window > 0:
            raise ValueError(
                f"{name('window_size')} = {window!r} but {name('window_block_indexes')} lists "
                f"blocks {indexes}: give window attention a positive window size, or list no "
                "blocks (global attention everywhere)."
            )
        windowed = bool(indexes)
    else:
        window, stride = get("adaptive_window_size"), get("patch_stride")[0]
        windowed = window > 0
    if not windowed or side is None:
        return
    padded = -(-side // _MAX_PADDING) * _MAX_PADDING
    grid = -(-padded // stride)
    if window > grid:
        key = name("window_size" if kind == "RevViT" else "adaptive_window_size")
        raise ValueError(
            f"{key} = {window} is larger than the token grid of the largest image: images of "
            f"at most {side} pixels a side ({sizes}), padded to {padded}, give at most {grid} x "
            f"{grid} tokens at stride {stride}. Every window is padded to {window} x {window} "
            f"tokens, so attention would cost as much as on an image of {window * stride} pixels "
            f"a side. Set {key} to at most {grid} (ViTDet uses 14 for 1024-pixel images)."
        )


def largest_image_side(augmentations: Sequence) -> Optional[int]:
    """The largest side of an image after ``augmentations`` (Detectron2 Augmentation objects),
    or None when they do not bound it (e.g. no resize)."""
    side = None
    for aug in augmentations:
        # Matched by class name and read by attribute, the same in Detectron2 v0.6 and main.
        name = type(aug).__name__
        if name == "ResizeShortestEdge":
            # Without a max_size (sys.maxsize by default) the long side follows the aspect ratio.
            max_size = getattr(aug, "max_size", math.inf)
            side = int(max_size) if max_size < 10**6 else None
        elif name == "ResizeScale":
            side = math.ceil(max(aug.target_height, aug.target_width) * aug.max_scale)
        elif name == "Resize":
            side = int(max(aug.shape))
        elif name == "FixedSizeCrop":
            crop = int(max(aug.crop_size))
            # Padded to the crop size, or at most the crop size.
            side = crop if getattr(aug, "pad", True) or side is None else min(side, crop)
    return side


def _check_common(names: SettingNames, period, threshold, lr) -> None:
    if not isinstance(period, int) or period < 0:
        raise ValueError(
            f"{names.check_period} = {period!r}: the reconstruction check runs every PERIOD "
            "iterations; set it to 0 (off) or a positive number of iterations."
        )
    if not threshold > 0:
        raise ValueError(
            f"{names.check_threshold} = {threshold!r}: the largest relative error of a rebuilt "
            "block input that the reconstruction check accepts must be positive (default 0.1)."
        )
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(
            f"{names.base_lr} = {lr!r}: the learning rate must be a finite number >= 0."
        )


def _check_num_classes_setting(names: SettingNames, num_classes) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(
            f"{names.num_classes} = {num_classes!r}: it is the number of object categories "
            "(without background) and must be at least 1."
        )


def check_yacs_config(cfg) -> None:
    """Check a merged yacs config before anything is built or written (raises ValueError)."""
    from .modeling.rev_mvit import RevMViT
    from .modeling.rev_vit import RevViT

    trunk = {"build_rev_vit_backbone": RevViT, "build_rev_mvit_backbone": RevMViT}.get(
        cfg.MODEL.BACKBONE.NAME
    )
    side = None
    if trunk is not None:
        from detectron2.data.detection_utils import build_augmentation

        sides = [largest_image_side(build_augmentation(cfg, train)) for train in (True, False)]
        side = max((s for s in sides if s is not None), default=None)
        if cfg.MODEL.REV.SQUARE_PAD > 0:
            side = max(side or 0, cfg.MODEL.REV.SQUARE_PAD)
    sizes = YACS.image_sizes + (f", {YACS.square_pad}" if cfg.MODEL.REV.SQUARE_PAD else "")
    if trunk is not None:
        # The arguments its builder gives the trunk (the named size's, or the size keys set),
        # the constructor's defaults for the rest.
        args = trunk.from_config(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        key = f"MODEL.{trunk.__name__.upper()}"
        name = lambda k: f"{key}.{k.upper()}"  # noqa: E731
        _check_trunk(trunk.__name__, _arg_getter(args, trunk), name, side, sizes)
    if trunk is not None and (
        cfg.INPUT.FORMAT == "BGR" or all(s == 1.0 for s in cfg.MODEL.PIXEL_STD)
    ):
        logger.warning(
            "INPUT.FORMAT = %s, MODEL.PIXEL_MEAN = %s, MODEL.PIXEL_STD = %s: Detectron2's ResNet "
            "(Caffe) input, but %s weights (ViT, MAE, MViTv2, rev_det's converters) expect RGB "
            'normalised with ImageNet statistics. Set INPUT.FORMAT "RGB", MODEL.PIXEL_MEAN '
            "[123.675, 116.28, 103.53], MODEL.PIXEL_STD [58.395, 57.12, 57.375] (as "
            "configs/COCO/Base-Rev-MaskRCNN.yaml), unless your weights were trained otherwise.",
            cfg.INPUT.FORMAT,
            list(cfg.MODEL.PIXEL_MEAN),
            list(cfg.MODEL.PIXEL_STD),
            trunk.__name__,
        )
    if any(size <= 0 for size in cfg.INPUT.MIN_SIZE_TRAIN):
        logger.warning(
            "INPUT.MIN_SIZE_TRAIN = %s: a size of 0 turns resizing off for training (images "
            "enter at their own size, and INPUT.MAX_SIZE_TRAIN does not apply); give the "
            "shorter sides to train at, e.g. (640, 672, ..., 1024) as the COCO configs.",
            tuple(cfg.INPUT.MIN_SIZE_TRAIN),
        )
    check = cfg.MODEL.REV.CHECK_RECONSTRUCTION
    _check_common(YACS, check.PERIOD, check.THRESHOLD, cfg.SOLVER.BASE_LR)
    if cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN":
        _check_num_classes_setting(YACS, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    check_weights_file(cfg.MODEL.WEIGHTS, YACS)


def check_no_flags_in_overrides(opts: Sequence[str]) -> None:
    """Raise ValueError if a command-line flag (``--resume``) comes after the config overrides:
    the argument parser takes everything from the first override on as overrides, so the flag
    would be ignored or break the KEY VALUE pairs."""
    flags = [o for o in opts if o.startswith("--")]
    if flags:
        raise ValueError(
            f"{' '.join(flags)} comes after the config overrides, which take the rest of the "
            "command line: put flags (--resume, --eval-only, --num-gpus, ...) before the "
            "overrides."
        )


# Keys the LazyConfig entry point reads with a default when a config does not set them.
_LAZY_DEFAULTS = {
    "seed": -1,
    "strict_load": False,
    "check_reconstruction": {"period": 0, "threshold": 0.1},
    # RevViTDet's coupling schedule (rev_det.training.CouplingSchedule; yacs: MODEL.REV.COUPLING).
    "coupling": {"alpha": (1.0, 0.0), "beta": (0.0, 1.0), "ramp": (0.0, 0.1)},
    # The optimizer step inside backward (rev_det.step_in_backward; yacs: SOLVER.STEP_IN_BACKWARD).
    "step_in_backward": False,
    # Your own COCO-format datasets, [[name, json_file, image_root], ...]
    # (rev_det.data.register_coco_datasets; yacs: DATASETS.COCO_INSTANCES).
    "coco_instances": [],
    # The heads recomputed in backward (rev_det.modeling.recompute_heads; MODEL.REV.RECOMPUTE_HEADS).
    "recompute_heads": False,
}


def complete_lazy_config(cfg) -> None:
    """Add the optional ``train.*`` keys rev_det reads (seed, strict_load,
    check_reconstruction, coupling, step_in_backward, recompute_heads, coco_instances,
    amp.precision) with their defaults, so that overriding them is
    overriding a known key and ``config.yaml`` records them."""
    for key, value in _LAZY_DEFAULTS.items():
        if key not in cfg.train:
            cfg.train[key] = value
        elif isinstance(value, dict):
            for sub, default in value.items():
                if sub not in cfg.train[key]:
                    cfg.train[key][sub] = default
    if "amp" in cfg.train and "precision" not in cfg.train.amp:
        cfg.train.amp.precision = "float16"


def _target(node) -> Any:
    """The callable of a LazyConfig node, or None."""
    target = node.get("_target_") if hasattr(node, "get") else None
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:  # an unresolvable target is instantiate's error to report
            return None
    return target


def _lazy_nodes(node, path: str) -> Iterator:
    """(dotted path, node) of every dict node under ``node``."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        yield path, node
        for key in node.keys():
            with contextlib.suppress(Exception):  # unresolvable interpolations: not ours to check
                yield from _lazy_nodes(node[key], f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _lazy_nodes(item, f"{path}.{i}")


def _arg_getter(node, target) -> Callable[[str], Any]:
    params = inspect.signature(target).parameters

    def get(arg):
        return node[arg] if arg in node else params[arg].default

    return get


def check_lazy_config(cfg) -> None:
    """Check a LazyConfig (overrides applied) before anything is built or written."""
    from detectron2.config import instantiate

    from .modeling.rev_mvit import RevMViT
    from .modeling.rev_vit import RevViT

    side = None
    for split in ("train", "test"):
        with contextlib.suppress(Exception):  # a config without such a loader or mapper
            augs = instantiate(cfg.dataloader[split].mapper.augmentations)
            s = largest_image_side(augs)
            side = s if side is None or (s is not None and s > side) else side
    nodes = [(path, node, _target(node)) for path, node in _lazy_nodes(cfg.get("model"), "model")]
    square_pad = max((node.get("square_pad") or 0 for _, node, _ in nodes), default=0)
    if square_pad:
        side = max(side or 0, square_pad)
    sizes = LAZY.image_sizes + (f", {LAZY.square_pad}" if square_pad else "")
    for path, node, target in nodes:
        for kind, cls in (("RevViT", RevViT), ("RevMViT", RevMViT)):
            if inspect.isclass(target) and issubclass(target, cls):
                name = lambda k, path=path: f"{path}.{k}"  # noqa: E731
                _check_trunk(kind, _arg_getter(node, target), name, side, sizes)
    scheduler = cfg.get("lr_multiplier", {}).get("scheduler", {})
    milestones, updates = scheduler.get("milestones", None), scheduler.get("num_updates", None)
    if milestones and isinstance(updates, int) and max(milestones) >= updates:
        # fvcore's MultiStepParamScheduler refuses it too, without naming the settings.
        raise ValueError(
            f"lr_multiplier.scheduler.milestones = {list(milestones)} reach beyond "
            f"lr_multiplier.scheduler.num_updates = {updates} (train.max_iter): set the "
            "milestones below it, e.g. scaled with train.max_iter."
        )
    check = cfg.train.get("check_reconstruction", {})
    optimizer = cfg.get("optimizer", {})
    _check_common(
        LAZY, check.get("period", 0), check.get("threshold", 0.1), optimizer.get("lr", None)
    )
    roi_heads = cfg.get("model", {}).get("roi_heads", None)
    if roi_heads is not None:
        _check_num_classes_setting(LAZY, roi_heads.get("num_classes", None))
    check_weights_file(cfg.train.get("init_checkpoint", ""), LAZY)


def check_lazy_overrides(cfg, overrides: Sequence[str]) -> None:
    """Raise KeyError if an override ``a.b.c=value`` names a key the config does not have.

    A key is known if the config has it, or if it is an argument of the callable its parent
    node instantiates (``model.backbone.net.patch_size`` for ``L(RevViT)(...)`` without one).
    Hydra's ``+a.b=value`` adds a key on purpose and is not checked.
    """
    from omegaconf import DictConfig, ListConfig

    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.startswith(("+", "~")):
            continue
        node, parts = cfg, key.split(".")
        for depth, part in enumerate(parts):
            parent = ".".join(parts[:depth])
            if isinstance(node, ListConfig):
                if not (part.isdigit() and int(part) < len(node)):
                    raise KeyError(
                        f"Override {override!r}: {parent} is a list of {len(node)} items; "
                        f"{part!r} is not one of its indexes."
                    )
                node = node[int(part)]
                continue
            if not isinstance(node, DictConfig):
                break  # a value below a leaf: Detectron2's apply_overrides names it
            if part in node:
                try:
                    node = node[part]
                except Exception:  # an interpolation that does not resolve yet: not a typo
                    break
                continue
            target = _target(node)
            params = {}
            if callable(target):
                with contextlib.suppress(TypeError, ValueError):  # no signature (builtins)
                    params = inspect.signature(target).parameters
            if part in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
                break  # an argument the config leaves at its default
            candidates = sorted({*node.keys(), *params} - {"_target_"})
            close = difflib.get_close_matches(part, candidates, n=1, cutoff=0.6)
            prefix = f"{parent}." if parent else ""
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise KeyError(
                f"Override {override!r}: {prefix}{part} is not a key of the config "
                f"({hint}{parent or 'the config'} has {candidates}). To add a new key "
                f"on purpose, write +{key}=..."
            )


# ------------------------------------------------------------------------------------- files


_ZIP_MAGIC = b"PK\x03\x04"


def checkpoint_file_problem(path: str) -> Optional[str]:
    """Why the local file ``path`` cannot be a checkpoint, as a phrase completing "the file ...",
    or None if it may be one (a zip archive as torch.save writes, or a pickle)."""
    if not os.path.exists(path):
        return "does not exist"
    if os.path.isdir(path):
        return "is a directory, not a checkpoint file"
    size = os.path.getsize(path)
    if size == 0:
        return "is empty (0 bytes), not a checkpoint"
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            return (
                f"is a damaged or truncated zip archive ({size} bytes; {e}), the format "
                "torch.save writes: it was not downloaded or written completely"
            )
        return None
    # Pickle protocols 2-5 start with the PROTO opcode; legacy torch.save files with a pickled
    # magic number too.
    if head[:1] == b"\x80":
        return None
    if head.startswith(b"version https://git-lfs"):
        return "is a Git LFS pointer, not the checkpoint itself: fetch it with `git lfs pull`"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        return f"is a text file (it starts with {first!r}), not a checkpoint"
    return (
        f"is neither a zip archive as torch.save writes nor a pickle (it starts with bytes "
        f"{head[:8].hex(' ')}): not a checkpoint"
    )


def check_weights_file(path: str, names: SettingNames = YACS) -> None:
    """Raise ValueError if ``path`` (``MODEL.WEIGHTS`` / ``train.init_checkpoint``) is a local
    file that cannot be a checkpoint. URLs and missing files are left to the loader."""
    # A missing file may not be needed (a resumed run loads its last checkpoint instead); the
    # loader names it if it is.
    if not path or "://" in path or not os.path.exists(path):
        return
    problem = checkpoint_file_problem(path)
    if problem is not None:
        raise ValueError(
            f"{names.weights} = {path!r}: the file {problem}. Point {names.weights} at a "
            "checkpoint written by torch.save or Detectron2 (.pth), a Detectron2 model-zoo "
            ".pkl, or a published trunk converted with tools/convert_pretrained.py; or set it "
            "to '' to train from scratch."
        )


# ---------------------------------------------------------------------------------------- data


@dataclasses.dataclass
class AnnotationSummary:
    """What :func:`scan_annotations` found in a list of dataset dicts."""

    boxes: int = 0
    categories: Counter = dataclasses.field(default_factory=Counter)
    dropped: Dict[str, int] = dataclasses.field(default_factory=dict)


def _where(d: dict, i: int) -> str:
    return f"image_id {d.get('image_id')!r} ({d.get('file_name')}), annotation {i}"


def scan_annotations(dicts: Sequence[dict], names: Sequence[str] = ()) -> AnnotationSummary:
    """Count boxes and categories of the non-crowd annotations in Detectron2 dataset dicts.

    Raises ValueError for boxes of negative or non-finite size (Detectron2 would swap their
    corners or train on NaN) and for negative category ids; logs a warning with counts of
    boxes Detectron2's mapper drops without a word: zero width or height, or entirely outside
    their image (it clips boxes to the image, then drops the empty ones).
    """
    summary, bad, examples = AnnotationSummary(), [], {}
    dropped = Counter()
    for d in dicts:
        width, height = d.get("width"), d.get("height")
        for i, ann in enumerate(d.get("annotations", ())):
            if ann.get("iscrowd", 0) or "bbox" not in ann:
                continue  # Detectron2's mapper skips crowd annotations
            mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
            if mode == BoxMode.XYWH_ABS:
                x0, y0, w, h = (float(v) for v in ann["bbox"])
            elif mode == BoxMode.XYXY_ABS:
                x0, y0, x1, y1 = (float(v) for v in ann["bbox"])
                w, h = x1 - x0, y1 - y0
            else:
                continue  # relative and rotated boxes: Detectron2's own errors apply
            summary.boxes += 1
            category = ann.get("category_id")
            if isinstance(category, int) and category < 0:
                bad.append(f"{_where(d, i)}: category_id {category}")
                continue
            summary.categories[category] += 1
            if not all(math.isfinite(v) for v in (x0, y0, w, h)) or w < 0 or h < 0:
                bad.append(f"{_where(d, i)}: bbox {list(ann['bbox'])} ({BoxMode(mode).name})")
                continue
            reason = None
            if w == 0 or h == 0:
                reason = "of zero width or height"
            elif width is not None and height is not None:
                if min(x0 + w, width) <= max(x0, 0) or min(y0 + h, height) <= max(y0, 0):
                    reason = f"entirely outside their {width}x{height} image"
            if reason:
                dropped[reason] += 1
                examples.setdefault(reason, f"{_where(d, i)}: bbox {list(ann['bbox'])}")
    where = f" of {', '.join(names)}" if names else ""
    if bad:
        raise ValueError(
            f"{len(bad)} annotations{where} have a box of negative or non-finite width or "
            f"height, or a negative category id, e.g. {'; '.join(bad[:3])}. Detectron2 would "
            "silently swap the corners of such a box (or train on NaN). Fix the annotations: a "
            "negative width or height usually means that the corners, or bbox_mode (XYWH_ABS "
            "vs XYXY_ABS), are wrong."
        )
    summary.dropped = dict(dropped)
    for reason, count in dropped.items():
        logger.warning(
            "%d of the %d boxes%s are %s; Detectron2 drops them in training (first: %s). Fix "
            "the annotations if these objects should be learned.",
            count,
            summary.boxes,
            where,
            reason,
            examples[reason],
        )
    return summary


def check_num_classes(
    summary: Optional[AnnotationSummary],
    dataset_names: Sequence[str],
    num_classes: Optional[int],
    names: SettingNames = YACS,
) -> None:
    """Raise ValueError if the training data has more categories than the classifier.

    The categories are the largest contiguous ``category_id`` in the dataset dicts (the ids
    the model is trained on) plus one, or the datasets' ``thing_classes`` if there are more.
    Fewer categories than ``num_classes`` is logged: the extra outputs are never trained.
    """
    if num_classes is None:
        return
    from detectron2.data import MetadataCatalog

    found, source = 0, ""
    if summary is not None and summary.categories:
        ids = [c for c in summary.categories if isinstance(c, int)]
        if ids:
            found, source = max(ids) + 1, f"category ids up to {max(ids)} in its annotations"
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) > found:
            found, source = len(classes), f"{len(classes)} thing_classes in {name}'s metadata"
    if not found:
        return
    datasets = ", ".join(dataset_names) or "the training data"
    if found > num_classes:
        raise ValueError(
            f"The training data ({datasets}) has {found} categories ({source}) but "
            f"{names.num_classes} = {num_classes}: ids {num_classes}..{found - 1} have no "
            f"classifier output, and the loss would fail at the first such box. Set "
            f"{names.num_classes} to {found}."
        )
    if found < num_classes:
        logger.warning(
            "%s = %d but the training data (%s) has %d categories (%s): the other %d "
            "classifier outputs are never trained.",
            names.num_classes,
            num_classes,
            datasets,
            found,
            source,
            num_classes - found,
        )


# PIL modes of more than 8 bits per channel; Detectron2 converts images to 8-bit RGB / BGR,
# which clips these values at 255 (a 16-bit grayscale image becomes all white).
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class CheckedMapper:
    """A dataset mapper that names the image file in its errors and refuses images Detectron2
    would read wrongly.

    Before mapping, the image's header is read (the pixels are not decoded): a file PIL cannot
    identify, or one of more than 8 bits per channel (16-bit grayscale PNGs, 32-bit TIFFs),
    raises an OSError naming it and the fix. A read error while mapping (a truncated JPEG) is
    raised as an OSError naming the file and the dataset dict.

    Args:
        mapper: maps a dataset dict to the model's input (e.g. Detectron2's DatasetMapper).
    """

    def __init__(self, mapper: Callable):
        self.mapper = mapper

    def __call__(self, dataset_dict: dict):
        file_name = dataset_dict.get("file_name")
        if file_name:
            _check_image_file(file_name, dataset_dict)
        try:
            return self.mapper(dataset_dict)
        except (OSError, SyntaxError) as e:  # PIL raises SyntaxError for some broken PNGs
            if not file_name:
                raise
            raise OSError(
                f"Cannot read image {file_name} (image_id {dataset_dict.get('image_id')!r}): "
                f"{type(e).__name__}: {e}. The file is damaged or truncated: replace it, or "
                "remove it from the dataset."
            ) from e


def _check_image_file(file_name: str, dataset_dict: dict) -> None:
    from detectron2.utils.file_io import PathManager
    from PIL import Image, UnidentifiedImageError

    image_id = dataset_dict.get("image_id")
    try:
        with PathManager.open(file_name, "rb") as f, Image.open(f) as image:
            mode, fmt = image.mode, image.format
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as e:
        raise OSError(
            f"Image {file_name} (image_id {image_id!r}) is larger than PIL opens by default "
            f"({e}). Resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted."
        ) from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        size = os.path.getsize(file_name) if os.path.isfile(file_name) else None
        what = "an empty file" if size == 0 else "not an image file PIL can read"
        raise OSError(
            f"Cannot read image {file_name} (image_id {image_id!r}): it is {what} ({e}). "
            "Replace it, or remove it from the dataset."
        ) from e
    if mode in _WIDE_MODES:
        raise OSError(
            f"Image {file_name} (image_id {image_id!r}) is a {fmt} of PIL mode {mode!r}, more "
            "than 8 bits per channel: Detectron2 reads images as 8-bit RGB and would clip it "
            "(a 16-bit grayscale image trains as all white). Convert the dataset's images to 8 "
            "bits first, scaled to their value range (e.g. for 16-bit: "
            "Image.fromarray((np.asarray(im) >> 8).astype(np.uint8)))."
        )


# ---------------------------------------------------------------------------- output directory


# Write errors whose cause is the file system, not the data being written.
_FS_ERRNOS = {
    errno.ENOSPC: "the file system is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
}


def explain_write_error(path: str, error: BaseException) -> Optional[OSError]:
    """An OSError naming ``path`` and the fix if ``error`` (or an exception it was raised
    while handling, such as torch.save's RuntimeError after a failed write) comes from a full,
    read-only or forbidden file system; None otherwise."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FS_ERRNOS:
            directory = os.path.dirname(os.path.abspath(path))
            free = ""
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(directory).free / 2**20
                free = f" ({free:.0f} MiB free there without the partial file)"
            return OSError(
                seen.errno,
                f"Cannot write {path}: {_FS_ERRNOS[seen.errno]}{free}; {path} is unchanged. "
                f"Make room or fix the permissions of {directory}, or point "
                "the output (OUTPUT_DIR / train.output_dir, --output) to another directory; "
                "then resume.",
            )
        seen = seen.__cause__ or seen.__context__
    return None


class OutputDirInUseError(RuntimeError):
    """Another live run holds the output directory."""


# Temporary files of rev_det.checkpoint.atomic_open: ".<name>.<8 hex digits>.tmp".
_TMP_FILE = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
_LOCK_FILE = "run.lock"


class OutputDirLock:
    """Hold an output directory for one run: ``with OutputDirLock(cfg.OUTPUT_DIR): ...``.

    The lock is ``<directory>/run.lock``, held with ``fcntl.flock`` (the kernel releases it when
    the process ends, however it ends) and holding a line that describes the run (pid, host,
    start time, command) for the message another run gets. On exit the file is removed. A file
    left by a run that was killed or crashed is not locked by anyone: it is taken over, and
    :meth:`tidy` logs it. A second run while the first is alive raises
    :class:`OutputDirInUseError` naming the directory and the running process.

    Args:
        directory: the output directory (created if missing).
        setting: its setting's name, for messages (``OUTPUT_DIR``, ``train.output_dir``).
        enabled: False in processes other than the main one, which only share the directory.
    """

    def __init__(self, directory: str, setting: str = YACS.output_dir, enabled: bool = True):
        self.directory, self.setting, self.enabled = directory, setting, enabled
        self.path = os.path.join(directory, _LOCK_FILE)
        self.previous: Optional[str] = None
        self._fd: Optional[int] = None

    def __enter__(self) -> "OutputDirLock":
        if self.enabled and self.directory:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    owner = _read_fd(fd)
                    os.close(fd)
                    raise OutputDirInUseError(
                        f"{self.setting} {os.path.abspath(self.directory)} is in use by another "
                        f"run: {_describe_owner(owner)}. Its checkpoints, metrics and logs would "
                        f"mix with this run's. Wait for it to end (or stop it), or set "
                        f"{self.setting} to another directory."
                    ) from None
                # The previous holder removes the file on release: if it did so after we opened
                # it, we hold a lock on a file no longer in the directory; open it again.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self.previous = _read_fd(fd) or None
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_this_run()) + "\n").encode(), 0)
                os.fsync(fd)
                self._fd = fd
        except OSError as e:
            raise OSError(
                e.errno,
                f"{self.setting} {os.path.abspath(self.directory)} cannot be written "
                f"({e.strerror or e}): training writes its checkpoints, metrics and logs there. "
                f"Choose a writable directory with free space for {self.setting}.",
            ) from e

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still locked, so that no other run can lock this file meanwhile.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def tidy(self) -> List[str]:
        """Log a taken-over stale lock and remove temporary files of interrupted checkpoint
        saves (``.<name>.<hex>.tmp``); call it once logging is set up. Returns their names."""
        if self._fd is None:
            return []
        if self.previous:
            logger.warning(
                "%s %s had a lock of a run that did not end cleanly (%s; it holds no lock, so "
                "it was killed or crashed); this run takes the directory over.",
                self.setting,
                self.directory,
                _describe_owner(self.previous),
            )
        removed = []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if _TMP_FILE.match(name) and os.path.isfile(path):
                size = os.path.getsize(path)
                os.unlink(path)
                removed.append(f"{name} ({size / 2**20:.1f} MiB)")
        if removed:
            logger.warning(
                "Removed %d temporary files left in %s by interrupted checkpoint saves: %s.",
                len(removed),
                self.directory,
                ", ".join(removed),
            )
        return removed


def _this_run() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }


def _read_fd(fd: int) -> str:
    return os.pread(fd, 65536, 0).decode(errors="replace").strip()


def _describe_owner(text: str) -> str:
    try:
        run = json.loads(text)
        return (
            f"pid {run['pid']} on host {run['host']}, started {run['started']}, "
            f"command: {run['command']}"
        )
    except (ValueError, KeyError, TypeError):
        return f"lock file content {text[:200]!r}"


# ---------------------------------------------------------------------------------- divergence


@contextlib.contextmanager
def divergence_advice(trainer, names: SettingNames = YACS, lr: Optional[float] = None):
    """Re-raise a FloatingPointError of training (a non-finite loss, Detectron2's "Training has
    diverged" on non-finite boxes) with the iteration and what to change. The reconstruction
    check's errors carry their own advice and pass unchanged."""
    from .reversible import ReconstructionError

    try:
        yield
    except ReconstructionError:
        raise
    except FloatingPointError as e:
        at = f" ({names.base_lr} = {lr:g})" if lr is not None else ""
        raise FloatingPointError(
            f"Training diverged at iteration {trainer.iter}: {e}\nThe loss or the predicted "
            f"boxes became infinite or NaN, most often because the learning rate is too high "
            f"for the batch{at}. What to do: lower {names.base_lr} (e.g. 10x; scale it with "
            f"the total batch size), lengthen the warm-up ({names.warmup}), or clip gradients "
            "(yacs: SOLVER.CLIP_GRADIENTS.ENABLED); with float16 AMP, try bfloat16 or float32. "
            "If it diverges even so, check the data for broken boxes."
        ) from e
