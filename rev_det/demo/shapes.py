"""The embedded synthetic instance-segmentation dataset ``revdet_shapes``, in COCO format.

COCO cannot be downloaded everywhere rev_det is tested, so the project ships a small
deterministic dataset that is generated on first use (the first ``DatasetCatalog.get``) and
then read through exactly the same Detectron2 code as COCO (``load_coco_json`` and
``COCOEvaluator``).

Each image shows 1 to 6 filled, textured shapes (six categories) that overlap and occlude each
other, on a cluttered background (gradient, noise, thin lines, soft blobs) that is not
annotated. Masks are the *visible* part of each object, stored as compressed RLE; a shape is
only placed if neither it nor any shape it covers would be left nearly invisible, so every
annotation is a clearly visible object and no unannotated object fragments remain.

Layout under ``<root>/revdet_shapes/`` (``root`` defaults to ``$DETECTRON2_DATASETS`` or
``datasets``, as in Detectron2)::

    train/000000.jpg ...
    val/000000.jpg ...
    annotations/instances_train.json
    annotations/instances_val.json
    MANIFEST.json       written last; generator version, seed, sizes, sha256 of every file

``revdet_shapes_test`` (600 images of the stream "test", drawn alike; for comparisons that need
more than the 100 validation images) has the same layout under ``<root>/revdet_shapes_test/``.

Every image is drawn from its own ``numpy.random.default_rng((seed, split, index))`` stream,
so the same seed reproduces the same bytes.
"""

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from PIL import Image, ImageDraw
from pycocotools import mask as mask_util
from tqdm import tqdm

from ..utils.files import sha256_file

__all__ = [
    "MAX_OBJECTS",
    "SHAPES_CATEGORIES",
    "SHAPES_DATASETS",
    "SHAPES_TEST_DATASET",
    "SHAPES_TEST_SIZE",
    "check_stream",
    "draw_shapes_sample",
    "ensure_shapes_dataset",
    "ensure_shapes_stream",
    "register_shapes_datasets",
    "shapes_dataset_dir",
]

logger = logging.getLogger(__name__)

# Bump whenever the drawing code changes, so that existing caches are regenerated.
GENERATOR_VERSION = 1

SHAPES_CATEGORIES = [
    {"id": 1, "name": "circle"},
    {"id": 2, "name": "triangle"},
    {"id": 3, "name": "square"},
    {"id": 4, "name": "star"},
    {"id": 5, "name": "ellipse"},
    {"id": 6, "name": "hexagon"},
]
SHAPES_DATASETS = ("revdet_shapes_train", "revdet_shapes_val")
# A larger held-out set, for comparisons that the 100 validation images cannot settle.
SHAPES_TEST_DATASET = "revdet_shapes_test"
SHAPES_TEST_SIZE = 600
_TEST_STREAM = "test"
_SPLITS = ("train", "val")
_DIR_NAME = "revdet_shapes"
_MANIFEST = "MANIFEST.json"

# Only used by the Visualizer; one well-separated colour per category.
_THING_COLORS = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
]

_SIDE_RANGE = (192, 320)  # image width and height, drawn independently
_MIN_SIZE = 16  # smallest circumscribed diameter of a shape, in px
_MAX_SIZE_FRAC = 0.45  # largest diameter, as a fraction of the image's short side
MAX_OBJECTS = 6  # per image
_MIN_VISIBLE_AREA = 60  # px
_MIN_VISIBLE_FRAC = 0.25  # of the shape's full (unoccluded, unclipped) area
_PLACEMENT_TRIES = 8  # per wanted object; failed tries are simply skipped
_JPEG_QUALITY = 90
_STAR_INNER_RATIO = 0.45
_ELLIPSE_RATIO_RANGE = (0.45, 0.7)  # minor / major axis; far enough from 1 to tell from circles


def shapes_dataset_dir(root: Optional[str] = None) -> str:
    """Directory holding the dataset: ``<root>/revdet_shapes``.

    Args:
        root: Datasets root; defaults to ``$DETECTRON2_DATASETS`` or ``datasets``, like
            Detectron2's builtin datasets.
    """
    if root is None:
        root = os.environ.get("DETECTRON2_DATASETS", "datasets")
    return os.path.join(os.path.expanduser(root), _DIR_NAME)


def _split_paths(dataset_dir: str, split: str) -> Tuple[str, str]:
    """(json file, image root) of one split."""
    json_file = os.path.join(dataset_dir, "annotations", f"instances_{split}.json")
    return json_file, os.path.join(dataset_dir, split)


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def _shape_outline(name: str, radius: float, angle: float, ellipse_ratio: float) -> np.ndarray:
    """Vertices (N, 2) of a shape centred at the origin; round shapes become 48-gons."""
    if name in ("circle", "ellipse"):
        t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
        minor = ellipse_ratio if name == "ellipse" else 1.0
        pts = np.stack([radius * np.cos(t), radius * minor * np.sin(t)], axis=1)
    else:
        n = {"triangle": 3, "square": 4, "hexagon": 6, "star": 10}[name]
        t = np.arange(n) * (2.0 * np.pi / n)
        r = np.full(n, radius)
        if name == "star":
            r[1::2] *= _STAR_INNER_RATIO
        pts = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]])


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rasterize(pts: np.ndarray, height: int, width: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _place_objects(rng: np.random.Generator, height: int, width: int) -> List[dict]:
    """Choose shapes and positions so that every placed shape stays clearly visible.

    A candidate is rejected if its own visible part, or that of any shape it would cover, falls
    below the visibility limits; this keeps annotations meaningful and, unlike dropping
    objects after drawing, leaves no unannotated shape fragments in the image.
    """
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    max_size = _MAX_SIZE_FRAC * min(height, width)
    owner = np.zeros((height, width), dtype=np.int16)  # 0 = background, k = k-th object
    objects: List[dict] = []
    visible: List[int] = []
    tries = 0
    # "or not objects" guarantees that no image is left without annotations; it cannot loop for
    # long because on an empty canvas only small shapes cut by the border are rejected.
    while len(objects) < wanted and (tries < _PLACEMENT_TRIES * wanted or not objects):
        tries += 1
        cat = int(rng.integers(len(SHAPES_CATEGORIES)))
        # sqrt skews sizes towards the large end: the mean object is big enough for a small
        # CPU model to learn quickly, while small objects still occur.
        radius = 0.5 * (_MIN_SIZE + (max_size - _MIN_SIZE) * np.sqrt(rng.random()))
        pts = _shape_outline(
            SHAPES_CATEGORIES[cat]["name"],
            radius,
            rng.uniform(0.0, 2.0 * np.pi),
            rng.uniform(*_ELLIPSE_RATIO_RANGE),
        )
        # Centres may sit close to the border so that truncated objects occur too.
        centre = rng.uniform(
            [0.3 * radius, 0.3 * radius], [width - 0.3 * radius, height - 0.3 * radius]
        )
        pts = pts + centre
        full_area = _polygon_area(pts)
        mask = _rasterize(pts, height, width)
        area = int(mask.sum())
        if area < max(_MIN_VISIBLE_AREA, _MIN_VISIBLE_FRAC * full_area):
            continue
        covered = np.bincount(owner[mask], minlength=len(objects) + 1)[1:]
        remaining = np.asarray(visible, dtype=np.int64) - covered
        limits = [max(_MIN_VISIBLE_AREA, _MIN_VISIBLE_FRAC * o["full_area"]) for o in objects]
        if np.any(remaining < np.asarray(limits)):
            continue
        owner[mask] = len(objects) + 1
        visible = remaining.tolist() + [area]
        objects.append({"category": cat, "mask": mask, "full_area": full_area})
    for k, obj in enumerate(objects):
        obj["visible"] = owner == k + 1
    return objects


def _uniform_noise(rng: np.random.Generator, shape: tuple, spread: float) -> np.ndarray:
    """Zero-mean uniform noise of total width ``spread``; several times cheaper than normal."""
    return (rng.random(shape, dtype=np.float32) - 0.5) * spread


def _background(rng: np.random.Generator, height: int, width: int) -> Tuple[np.ndarray, list]:
    """Float RGB clutter background and its two gradient end colours."""
    ends = rng.uniform(40.0, 215.0, size=(2, 3)).astype(np.float32)
    direction = rng.uniform(0.0, 2.0 * np.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    proj = xx * np.cos(direction) + yy * np.sin(direction)
    t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
    img = ends[0] + t[..., None] * (ends[1] - ends[0])
    img += _uniform_noise(rng, (height, width, 3), rng.uniform(6.0, 18.0))

    # Soft, small blobs: texture-like distractors whose blurry edges and size (< _MIN_SIZE)
    # keep them from looking like the crisp, larger objects.
    for _ in range(int(rng.integers(2, 10))):
        sigma = rng.uniform(1.5, 3.5)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        amp = rng.uniform(-50.0, 50.0, size=3).astype(np.float32)
        x0, x1 = int(max(cx - 3 * sigma, 0)), int(min(cx + 3 * sigma + 1, width))
        y0, y1 = int(max(cy - 3 * sigma, 0)), int(min(cy + 3 * sigma + 1, height))
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        g = np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * sigma**2))
        img[y0:y1, x0:x1] += g[..., None] * amp

    # Thin lines are drawn on an 8-bit layer because PIL draws lines, then merged.
    lines = Image.new("RGB", (width, height))
    line_mask = Image.new("L", (width, height))
    draw, draw_mask = ImageDraw.Draw(lines), ImageDraw.Draw(line_mask)
    for _ in range(int(rng.integers(2, 9))):
        xy = [tuple(p) for p in rng.uniform([0, 0], [width, height], size=(2, 2)).tolist()]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line(xy, fill=colour, width=1)
        draw_mask.line(xy, fill=255, width=1)
    on_line = np.asarray(line_mask) > 0
    img[on_line] = np.asarray(lines, dtype=np.float32)[on_line]
    return img, [ends[0], ends[1]]


def _object_colour(rng: np.random.Generator, avoid_bg: list, avoid_obj: list) -> np.ndarray:
    """A random colour that stands out from the background and from earlier objects."""
    candidates = rng.integers(0, 256, size=(16, 3)).astype(np.float32)

    def min_dist(refs: list) -> np.ndarray:
        if not refs:
            return np.full(len(candidates), np.inf, dtype=np.float32)
        return np.linalg.norm(candidates[:, None] - np.stack(refs)[None], axis=2).min(axis=1)

    # Margin over the required distance (RGB units) from the background and from other objects.
    margin = np.minimum(min_dist(avoid_bg) - 90.0, min_dist(avoid_obj) - 60.0)
    good = np.flatnonzero(margin >= 0)
    # All 16 random candidates fail only rarely; then take the most distinct one.
    return candidates[good[0] if good.size else int(np.argmax(margin))]


def _texture(rng: np.random.Generator, colour: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float RGB patch of one object's texture: solid, stripes, checker or noise."""
    kind = int(rng.integers(4))
    patch = np.broadcast_to(colour, (height, width, 3)).astype(np.float32)
    if kind == 0:
        return patch
    if kind == 3:
        return patch + _uniform_noise(rng, (height, width, 3), 60.0)
    # The second colour is a darker tone of the first so the object keeps one overall hue.
    dark = colour * rng.uniform(0.5, 0.75)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 1:
        period = rng.uniform(4.0, 10.0)
        phi = rng.uniform(0.0, np.pi)
        alt = np.floor((xx * np.cos(phi) + yy * np.sin(phi)) / (period / 2)) % 2 == 1
    else:
        cell = rng.integers(3, 9)
        alt = (xx // cell + yy // cell) % 2 == 1
    patch = patch.copy()
    patch[alt] = dark
    return patch


def _draw_image(rng: np.random.Generator) -> Tuple[np.ndarray, List[dict]]:
    """One image (uint8 HWC RGB) and its objects, each with a ``visible`` bool mask."""
    width, height = (int(v) for v in rng.integers(_SIDE_RANGE[0], _SIDE_RANGE[1] + 1, size=2))
    objects = _place_objects(rng, height, width)
    img, bg_colours = _background(rng, height, width)
    colours: list = []
    # Painting in placement order reproduces the occlusion that _place_objects accounted for.
    for obj in objects:
        colour = _object_colour(rng, bg_colours, colours)
        colours.append(colour)
        ys, xs = np.nonzero(obj["mask"])
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        region = img[y0:y1, x0:x1]
        m = obj["mask"][y0:y1, x0:x1]
        region[m] = _texture(rng, colour, y1 - y0, x1 - x0)[m]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def _draw_jpeg(seed: int, stream: str, index: int) -> Tuple[bytes, np.ndarray, List[dict]]:
    """Image ``index`` of the named stream: its JPEG bytes, its pixels and its objects."""
    # crc32 rather than hash(): Python salts str hashes per process.
    rng = np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8")), index])
    pixels, objects = _draw_image(rng)
    buf = io.BytesIO()
    # Fixed encoder settings make the bytes a pure function of the pixels.
    Image.fromarray(pixels).save(buf, format="JPEG", quality=_JPEG_QUALITY, optimize=False)
    return buf.getvalue(), pixels, objects


def check_stream(stream: str) -> None:
    """Raise if ``stream`` names a dataset split: its images would leak into pretraining."""
    if stream in _SPLITS:
        raise ValueError(
            f"stream {stream!r} is a split of the revdet_shapes datasets; name another stream "
            "(e.g. 'pretrain') so that no dataset image, validation images included, is reused."
        )


def draw_shapes_sample(stream: str, index: int, seed: int = 0) -> Tuple[Image.Image, List[dict]]:
    """One image of the shapes generator outside the registered datasets, e.g. for pretraining.

    The image is drawn exactly as the dataset's are (same distribution, same JPEG encoding) from
    its own random stream, keyed by ``(seed, stream, index)``; a stream name other than the
    dataset splits' ("train", "val") therefore never reproduces a dataset image.

    Args:
        stream: name of the image stream; "train" and "val" are refused.
        index: image number in the stream (any non-negative integer).
        seed: base seed, as for :func:`ensure_shapes_dataset`.

    Returns:
        The decoded RGB image, and its objects in painting order, each a dict with
        ``category_id`` (as in :data:`SHAPES_CATEGORIES`) and ``mask`` (bool HxW, the visible
        part).
    """
    check_stream(stream)
    data, _, objects = _draw_jpeg(seed, stream, index)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return image, [
        {"category_id": SHAPES_CATEGORIES[o["category"]]["id"], "mask": o["visible"]}
        for o in objects
    ]


def _encode_mask(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")  # json cannot store bytes
    return rle


def _generate_split(
    dataset_dir: str, split: str, num_images: int, seed: int
) -> Dict[str, Tuple[int, str]]:
    """Write one split's images and json; returns {relative path: (size, sha256)}."""
    json_file, image_root = _split_paths(dataset_dir, split)
    os.makedirs(image_root, exist_ok=True)
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    files: Dict[str, Tuple[int, str]] = {}
    images, annotations = [], []
    for index in tqdm(range(num_images), desc=f"revdet_shapes {split}", unit="img"):
        data, pixels, objects = _draw_jpeg(seed, split, index)
        file_name = f"{index:06d}.jpg"
        with open(os.path.join(image_root, file_name), "wb") as f:
            f.write(data)
        files[f"{split}/{file_name}"] = (len(data), hashlib.sha256(data).hexdigest())

        image_id = index + 1
        height, width = pixels.shape[:2]
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for obj in objects:
            rle = _encode_mask(obj["visible"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": SHAPES_CATEGORIES[obj["category"]]["id"],
                    "segmentation": rle,
                    "area": int(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"revdet_shapes {split}", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, supercategory="shape") for c in SHAPES_CATEGORIES],
    }
    data = json.dumps(coco, separators=(",", ":")).encode("utf-8")
    with open(json_file, "wb") as f:
        f.write(data)
    rel = os.path.relpath(json_file, dataset_dir).replace(os.sep, "/")
    files[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return files


# ---------------------------------------------------------------------------------------------
# Cache management
# ---------------------------------------------------------------------------------------------


def _params(sizes: Dict[str, Optional[int]], seed: int) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "num_images": dict(sizes)}


def _cache_problem(dataset_dir: str, params: dict) -> Optional[str]:
    """Why the cache in ``dataset_dir`` cannot be used, or None if it is complete and intact."""
    manifest_path = os.path.join(dataset_dir, _MANIFEST)
    if not os.path.isfile(manifest_path):
        return f"{manifest_path} is missing (generation never finished)"
    try:
        with open(manifest_path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        found = {k: manifest[k] for k in params}
    except (ValueError, KeyError, TypeError) as e:
        return f"{manifest_path} is unreadable ({e!r})"
    requested_sizes = params["num_images"]
    if None in requested_sizes.values():  # any size is fine: compare the rest
        params = dict(params, num_images=found["num_images"])
    if found != params:
        return f"cached parameters {found} differ from the requested {params}"
    for rel, entry in sorted(files.items()):
        path = os.path.join(dataset_dir, rel)
        if not os.path.isfile(path):
            return f"{path} is missing"
        if os.path.getsize(path) != entry["size"]:
            return f"{path} has size {os.path.getsize(path)}, expected {entry['size']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{path} has the wrong sha256 (file modified or corrupt)"
    return None


DEFAULT_SIZES = {"train": 800, "val": 100}


def ensure_shapes_dataset(
    root: Optional[str] = None,
    num_train: Optional[int] = None,
    num_val: Optional[int] = None,
    seed: int = 0,
) -> str:
    """Make sure a complete, intact copy of the shapes dataset exists; generate it if not.

    The cache is trusted only if its manifest exists, was made with the same generator version
    and parameters, and every listed file has the recorded size and sha256. Otherwise a
    warning says what was wrong and the directory is deleted and regenerated from scratch.
    Not safe to call from several processes at once: in distributed training call it on the
    main process and synchronize before the others read the data.

    Args:
        root: Datasets root; defaults to ``$DETECTRON2_DATASETS`` or ``datasets``.
        num_train: Number of training images. None accepts an intact cache of any size (e.g.
            a smaller one made for tests) and generates 800 if there is none.
        num_val: Number of validation images; None as for ``num_train`` (default 100).
        seed: Base seed; the same seed reproduces the same files byte for byte.

    Returns:
        The dataset directory, ``<root>/revdet_shapes``.
    """
    any_size = num_train is None or num_val is None
    num_train = DEFAULT_SIZES["train"] if num_train is None else num_train
    num_val = DEFAULT_SIZES["val"] if num_val is None else num_val
    dataset_dir = shapes_dataset_dir(root)
    _ensure(dataset_dir, {"train": num_train, "val": num_val}, seed, any_size=any_size)
    return dataset_dir


def _ensure(dataset_dir: str, sizes: Dict[str, int], seed: int, any_size: bool = False) -> None:
    """Generate the splits ``sizes`` ({split or stream: images}) into ``dataset_dir`` unless an
    intact cache of them is there (of any size if ``any_size``)."""
    requested = {k: None for k in sizes} if any_size else sizes
    problem = _cache_problem(dataset_dir, _params(requested, seed))
    if problem is None:
        logger.info("Using the cached revdet_shapes images in %s", dataset_dir)
        return
    if os.path.exists(dataset_dir):
        logger.warning("Regenerating revdet_shapes in %s: %s", dataset_dir, problem)
        shutil.rmtree(dataset_dir)
    else:
        logger.info("Generating the revdet_shapes images in %s", dataset_dir)
    files: Dict[str, Tuple[int, str]] = {}
    for split, num_images in sizes.items():
        files.update(_generate_split(dataset_dir, split, num_images, seed))
    manifest = dict(
        _params(sizes, seed),
        files={rel: {"size": size, "sha256": sha} for rel, (size, sha) in sorted(files.items())},
    )
    # Written last and atomically: its presence means every other file was written completely.
    tmp_path = os.path.join(dataset_dir, _MANIFEST + ".tmp")
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp_path, os.path.join(dataset_dir, _MANIFEST))


def ensure_shapes_stream(
    stream: str, num_images: int, root: Optional[str] = None, seed: int = 0
) -> Tuple[str, str]:
    """Make sure ``num_images`` images of another stream of the generator exist, in COCO format.

    E.g. a test set larger than ``revdet_shapes_val`` (100 images, where two models' AP can
    differ by a few points by luck): :data:`SHAPES_TEST_DATASET` is 600 images of the stream
    "test". The images are drawn exactly as the dataset's (:func:`draw_shapes_sample`) and
    cached and checked as :func:`ensure_shapes_dataset` does, in ``<root>/revdet_shapes_<stream>/``
    (``annotations/instances_<stream>.json`` and ``<stream>/``).

    Args:
        stream: name of the image stream; "train" and "val" are refused.
        num_images: number of images.
        root: Datasets root; defaults to ``$DETECTRON2_DATASETS`` or ``datasets``.
        seed: base seed, as for :func:`ensure_shapes_dataset`.

    Returns:
        ``(json_file, image_root)``.
    """
    check_stream(stream)
    dataset_dir = _stream_dir(root, stream)
    _ensure(dataset_dir, {stream: num_images}, seed)
    return _split_paths(dataset_dir, stream)


def _stream_dir(root: Optional[str], stream: str) -> str:
    return f"{shapes_dataset_dir(root)}_{stream}"


def register_shapes_datasets(root: Optional[str] = None) -> None:
    """Register ``revdet_shapes_train`` / ``revdet_shapes_val`` / ``revdet_shapes_test`` as
    COCO-format datasets.

    Nothing is generated or read at registration (this runs at ``import rev_det``): the first
    ``DatasetCatalog.get`` of a name generates its images if their cache is missing or corrupt
    (:func:`ensure_shapes_dataset`; for the test set, 600 images of another stream,
    :func:`ensure_shapes_stream`), then reads them with Detectron2's ``load_coco_json``,
    so stock Detectron2 tools use them after ``import rev_det`` alone. Their masks are COCO RLE:
    Detectron2's mapper needs ``INPUT.MASK_FORMAT "bitmask"`` (LazyConfig:
    ``dataloader.train.mapper.instance_mask_format="bitmask"``); the metadata cannot set it
    because the mapper reads it from the config only. Names that are already registered are
    left alone, so calling this again is safe.

    Args:
        root: Datasets root; defaults to ``$DETECTRON2_DATASETS`` or ``datasets``, read now.
    """
    dataset_dir = shapes_dataset_dir(root)
    # Resolved once, so the loader and the metadata (read by COCOEvaluator) name the same files.
    root = os.path.dirname(dataset_dir)
    ensure = functools.partial(ensure_shapes_dataset, root)
    for name, split in zip(SHAPES_DATASETS, _SPLITS):
        _register(name, ensure, root, _split_paths(dataset_dir, split))
    test_paths = _split_paths(_stream_dir(root, _TEST_STREAM), _TEST_STREAM)
    _register(SHAPES_TEST_DATASET, functools.partial(_ensure_test_set, root), root, test_paths)


def _ensure_test_set(root: str) -> None:
    ensure_shapes_stream(_TEST_STREAM, SHAPES_TEST_SIZE, root)


def _register(name: str, ensure: Callable[[], object], root: str, paths: Tuple[str, str]) -> None:
    """Register ``name``, whose images ``ensure()`` generates if needed, at ``paths``."""
    if name in DatasetCatalog.list():
        return
    json_file, image_root = paths
    DatasetCatalog.register(name, functools.partial(_load, root, name, ensure, paths))
    # What register_coco_instances records, plus the values load_coco_json derives from the
    # json, set now so that the Visualizer and evaluators can use them before the first load.
    MetadataCatalog.get(name).set(
        json_file=json_file,
        image_root=image_root,
        evaluator_type="coco",
        thing_classes=[c["name"] for c in SHAPES_CATEGORIES],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES)},
        thing_colors=list(_THING_COLORS),
    )


def _load(root: str, name: str, ensure: Callable[[], object], paths: Tuple[str, str]) -> List[dict]:
    """DatasetCatalog loader: generate the images if needed, then read them."""
    with _generation_lock(root):
        ensure()
    return load_coco_json(*paths, name)


@contextlib.contextmanager
def _generation_lock(root: str) -> Iterator[None]:
    """Hold an exclusive lock on a file of the temporary directory named after ``root``.

    Every process of a multi-process run (Detectron2's ``launch``) loads the dataset; the lock
    lets the first process of a machine generate it while the others wait and then find the
    cache complete. The lock file is not under ``root``, which may be read-only (a complete
    cache is only read).
    """
    key = hashlib.sha256(os.path.abspath(root).encode("utf-8")).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"{_DIR_NAME}-{key}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
