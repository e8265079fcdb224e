"""Checks of the training data.

:func:`scan_annotations` raises an error for boxes of negative or non-finite size and counts
in a warning the boxes Detectron2 would drop; :func:`check_num_classes` compares the
dataset's categories with the classifier; :class:`CheckedMapper` names unreadable and
16-bit image files.
"""

import dataclasses
import logging
import math
import os
from collections import Counter
from typing import Callable, Dict, Optional, Sequence

from detectron2.structures import BoxMode

from .names import YACS, SettingNames

__all__ = [
    "AnnotationSummary",
    "CheckedMapper",
    "check_num_classes",
    "scan_annotations",
]

logger = logging.getLogger(__name__)


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
