"""Checks of a config before anything is built or written.

:func:`check_yacs_config` and :func:`check_lazy_config` check the trunk (depth, heads, windows
larger than the token grid of the largest image), the reconstruction-check period, the
learning rate, the number of classes and the weights file; :func:`check_lazy_overrides`
refuses an override naming a key the config does not have (naming the closest one), and
:func:`check_no_flags_in_overrides` a flag after the overrides. :func:`complete_lazy_config`
adds the optional ``train.*`` keys rev_det reads, with their defaults.
"""

import contextlib
import difflib
import inspect
import logging
import math
from typing import Any, Callable, Iterator, Optional, Sequence

from detectron2.layers import ShapeSpec

from .files import check_weights_file
from .names import LAZY, YACS, SettingNames

__all__ = [
    "check_lazy_config",
    "check_lazy_overrides",
    "check_no_flags_in_overrides",
    "check_yacs_config",
    "complete_lazy_config",
    "largest_image_side",
]

logger = logging.getLogger(__name__)


# rev_det's backbones pad images to a multiple of their size divisibility, at most 64 (the p6
# stride of RevViT's pyramids), so the token grid can exceed the largest image by that much.
_MAX_PADDING = 64


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
    from ..modeling.rev_mvit import RevMViT
    from ..modeling.rev_vit import RevViT

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

    from ..modeling.rev_mvit import RevMViT
    from ..modeling.rev_vit import RevViT

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
