"""Tests of the embedded synthetic dataset revdet_shapes (rev_det/demo/shapes.py)."""

import hashlib
import json
import logging
import multiprocessing
import os
import time

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from helpers import DEMO_YAML, yacs_cfg
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from rev_det.data import (
    SHAPES_CATEGORIES,
    SHAPES_DATASETS,
    SHAPES_TEST_DATASET,
    ensure_shapes_dataset,
    fixed_training_batch,
    register_shapes_datasets,
)
from rev_det.demo import shapes

CATEGORY_NAMES = ["circle", "triangle", "square", "star", "ellipse", "hexagon"]


def file_digests(dataset_dir):
    """{relative path: sha256} of every file under dataset_dir."""
    out = {}
    for dirpath, _, names in os.walk(dataset_dir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, dataset_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A 12 train / 6 val dataset with seed 0, shared by the read-only tests."""
    return ensure_shapes_dataset(str(tmp_path_factory.mktemp("a")), num_train=12, num_val=6)


def test_same_seed_gives_identical_files(small_dir, tmp_path):
    again = ensure_shapes_dataset(str(tmp_path / "b"), num_train=12, num_val=6)
    digests = file_digests(small_dir)
    assert len(digests) == 12 + 6 + 2 + 1  # images, two jsons, manifest
    assert file_digests(again) == digests


def test_different_seed_gives_different_images(small_dir, tmp_path):
    other = file_digests(ensure_shapes_dataset(str(tmp_path), num_train=12, num_val=6, seed=1))
    ref = file_digests(small_dir)
    assert other.keys() == ref.keys()
    images = [k for k in ref if k.endswith(".jpg")]
    assert all(other[k] != ref[k] for k in images)


def test_layout_and_manifest(small_dir):
    assert os.path.basename(small_dir) == "revdet_shapes"
    for split, n in (("train", 12), ("val", 6)):
        assert sorted(os.listdir(os.path.join(small_dir, split))) == [
            f"{i:06d}.jpg" for i in range(n)
        ]
        assert os.path.isfile(os.path.join(small_dir, "annotations", f"instances_{split}.json"))
    with open(os.path.join(small_dir, "MANIFEST.json")) as f:
        manifest = json.load(f)
    assert manifest["seed"] == 0
    assert manifest["num_images"] == {"train": 12, "val": 6}
    digests = file_digests(small_dir)
    del digests["MANIFEST.json"]
    assert {k: v["sha256"] for k, v in manifest["files"].items()} == {
        k.replace(os.sep, "/"): v for k, v in digests.items()
    }


def test_annotations_are_valid_coco(tmp_path):
    dataset_dir = ensure_shapes_dataset(str(tmp_path), num_train=40, num_val=4, seed=3)
    coco = COCO(os.path.join(dataset_dir, "annotations", "instances_train.json"))
    assert [c["name"] for c in coco.loadCats(sorted(coco.getCatIds()))] == CATEGORY_NAMES
    assert [c["id"] for c in SHAPES_CATEGORIES] == [1, 2, 3, 4, 5, 6]
    assert [c["name"] for c in SHAPES_CATEGORIES] == CATEGORY_NAMES

    aspect_ratios, seen_categories = set(), set()
    for img in coco.loadImgs(coco.getImgIds()):
        with Image.open(os.path.join(dataset_dir, "train", img["file_name"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (img["width"], img["height"])
        assert 192 <= img["width"] <= 320 and 192 <= img["height"] <= 320
        aspect_ratios.add(img["width"] / img["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert 1 <= len(anns) <= 6
        for ann in anns:
            seen_categories.add(ann["category_id"])
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            mask = coco.annToMask(ann).astype(bool)
            assert mask.shape == (img["height"], img["width"])
            assert mask.sum() >= 60 and mask.sum() == ann["area"]
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            # Tight box in COCO's convention: it covers whole pixels, so w = x_max + 1 - x_min.
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
    assert min(aspect_ratios) < 0.85 and max(aspect_ratios) > 1.15
    assert seen_categories == {1, 2, 3, 4, 5, 6}


def test_visible_masks_do_not_overlap(small_dir):
    """Masks are visible regions, so the objects of one image partition their pixels."""
    coco = COCO(os.path.join(small_dir, "annotations", "instances_val.json"))
    for img_id in coco.getImgIds():
        masks = [coco.annToMask(a) for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id))]
        assert np.sum(masks, axis=0).max() == 1


@pytest.mark.parametrize(
    "corruption", ["truncate_image", "delete_image", "delete_manifest", "modify_json", "params"]
)
def test_corrupt_cache_is_regenerated(tmp_path, caplog, corruption):
    root = str(tmp_path)
    dataset_dir = ensure_shapes_dataset(root, num_train=6, num_val=3)
    good = file_digests(dataset_dir)
    image = os.path.join(dataset_dir, "train", "000002.jpg")
    if corruption == "truncate_image":
        with open(image, "r+b") as f:
            f.truncate(os.path.getsize(image) // 2)
    elif corruption == "delete_image":
        os.remove(image)
    elif corruption == "delete_manifest":
        os.remove(os.path.join(dataset_dir, "MANIFEST.json"))
    elif corruption == "modify_json":
        # Same size, so only the checksum can catch it.
        path = os.path.join(dataset_dir, "annotations", "instances_val.json")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace('"iscrowd":0', '"iscrowd":1', 1))
    else:
        with open(os.path.join(dataset_dir, "MANIFEST.json")) as f:
            manifest = json.load(f)
        manifest["seed"] = 7
        with open(os.path.join(dataset_dir, "MANIFEST.json"), "w") as f:
            json.dump(manifest, f)
    assert file_digests(dataset_dir) != good

    with caplog.at_level(logging.WARNING, logger=shapes.__name__):
        ensure_shapes_dataset(root, num_train=6, num_val=3)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Regenerating" in warnings[0].getMessage()
    assert file_digests(dataset_dir) == good


def test_intact_cache_is_reused(small_dir, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise AssertionError("an intact cache must not be regenerated")

    monkeypatch.setattr(shapes, "_generate_split", fail)
    with caplog.at_level(logging.WARNING, logger=shapes.__name__):
        root = os.path.dirname(small_dir)
        assert ensure_shapes_dataset(root, num_train=12, num_val=6) == small_dir
    assert not caplog.records


def test_registration_goes_through_detectron2(shapes_registered):
    root = shapes_registered
    assert not os.path.exists(os.path.join(root, "revdet_shapes"))  # registering generates nothing
    register_shapes_datasets(os.path.join(root, "elsewhere"))  # idempotent: keeps the first root
    ensure_shapes_dataset(root, num_train=2, num_val=5)

    dicts = DatasetCatalog.get(SHAPES_DATASETS[1])
    assert len(dicts) == 5
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert d["annotations"]
        for ann in d["annotations"]:
            assert set(ann["segmentation"]) == {"size", "counts"}
            assert ann["segmentation"]["size"] == [d["height"], d["width"]]
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < 6
    meta = MetadataCatalog.get(SHAPES_DATASETS[1])
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == CATEGORY_NAMES
    assert len(set(meta.thing_colors)) == 6
    assert len(DatasetCatalog.get(SHAPES_DATASETS[0])) == 2


def test_first_catalog_get_generates_the_dataset(shapes_registered, monkeypatch):
    # What a stock Detectron2 tool does after `import rev_det`: DatasetCatalog.get, nothing else.
    monkeypatch.setattr(shapes, "DEFAULT_SIZES", {"train": 3, "val": 2})
    dataset_dir = os.path.join(shapes_registered, "revdet_shapes")
    meta = MetadataCatalog.get(SHAPES_DATASETS[1])
    assert meta.json_file == os.path.join(dataset_dir, "annotations", "instances_val.json")
    assert meta.image_root == os.path.join(dataset_dir, "val")
    assert not os.path.exists(dataset_dir)

    val = DatasetCatalog.get(SHAPES_DATASETS[1])
    assert len(val) == 2 and all(os.path.isfile(d["file_name"]) for d in val)
    assert os.path.isfile(os.path.join(dataset_dir, "MANIFEST.json"))
    assert len(DatasetCatalog.get(SHAPES_DATASETS[0])) == 3
    # A corrupt cache is regenerated by the next get, too.
    with open(os.path.join(dataset_dir, "val", "000000.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    assert len(DatasetCatalog.get(SHAPES_DATASETS[1])) == 2
    assert shapes._cache_problem(dataset_dir, shapes._params({"train": 3, "val": 2}, 0)) is None
    assert os.listdir(shapes_registered) == ["revdet_shapes"]  # a read-only root would do


def _get_in_child(name, queue):
    queue.put(len(DatasetCatalog.get(name)))


def test_processes_loading_at_once_generate_the_dataset_once(
    shapes_registered, tmp_path, monkeypatch
):
    # Every process of a multi-process run loads the dataset; one generates, the others wait.
    monkeypatch.setattr(shapes, "DEFAULT_SIZES", {"train": 4, "val": 2})
    generated = tmp_path / "generated_splits"
    generate_split = shapes._generate_split

    def slow_generate_split(*args):
        with open(generated, "a") as f:
            f.write("+")
        time.sleep(0.5)  # long enough for every child to find the cache missing without a lock
        return generate_split(*args)

    monkeypatch.setattr(shapes, "_generate_split", slow_generate_split)
    context = multiprocessing.get_context("fork")  # the children inherit the registration
    queue = context.Queue()
    children = [
        context.Process(target=_get_in_child, args=(SHAPES_DATASETS[0], queue)) for _ in range(3)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0, 0, 0]
    assert sorted(queue.get(timeout=5) for _ in children) == [4, 4, 4]
    assert generated.read_text() == "++"  # train and val, once
    dataset_dir = os.path.join(shapes_registered, "revdet_shapes")
    assert shapes._cache_problem(dataset_dir, shapes._params({"train": 4, "val": 2}, 0)) is None


def test_ground_truth_scores_100_ap_in_coco_evaluator(shapes_registered, tmp_path):
    dataset_dir = ensure_shapes_dataset(shapes_registered, num_train=2, num_val=10)
    name = SHAPES_DATASETS[1]
    meta = MetadataCatalog.get(name)
    coco = COCO(os.path.join(dataset_dir, "annotations", "instances_val.json"))

    evaluator = COCOEvaluator(name, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    evaluator.reset()
    for img in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        boxes = [BoxMode.convert(a["bbox"], BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for a in anns]
        instances = Instances((img["height"], img["width"]))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.ones(len(anns))
        instances.pred_classes = torch.tensor(
            [meta.thing_dataset_id_to_contiguous_id[a["category_id"]] for a in anns]
        )
        instances.pred_masks = torch.stack(
            [torch.from_numpy(mask_util.decode(a["segmentation"]).astype(bool)) for a in anns]
        )
        inputs = [{"image_id": img["id"], "height": img["height"], "width": img["width"]}]
        evaluator.process(inputs, [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0, abs=1e-6)
    assert results["segm"]["AP"] == pytest.approx(100.0, abs=1e-6)


def test_unspecified_size_reuses_an_intact_cache_of_any_size(tmp_path):
    root = str(tmp_path)
    dataset_dir = ensure_shapes_dataset(root, num_train=4, num_val=2)
    manifest = os.path.join(dataset_dir, "MANIFEST.json")
    before = os.stat(manifest).st_mtime_ns
    assert ensure_shapes_dataset(root) == dataset_dir  # e.g. train_net.py on a test-sized cache
    assert os.stat(manifest).st_mtime_ns == before


def test_the_test_set_is_another_stream_cached_and_registered(shapes_registered, monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_TEST_SIZE", 4)
    root = shapes_registered
    meta = MetadataCatalog.get(SHAPES_TEST_DATASET)
    test_dir = os.path.join(root, "revdet_shapes_test")
    assert meta.json_file == os.path.join(test_dir, "annotations", "instances_test.json")
    assert meta.evaluator_type == "coco" and meta.thing_classes == CATEGORY_NAMES
    assert not os.path.exists(test_dir)  # registering generates nothing

    test = DatasetCatalog.get(SHAPES_TEST_DATASET)
    assert len(test) == 4 and all(d["annotations"] for d in test)
    assert not os.path.exists(os.path.join(root, "revdet_shapes"))  # only what was asked for
    # Drawn from its own stream: no image is one of the validation images.
    val_dir = ensure_shapes_dataset(root, num_train=1, num_val=4)
    val = file_digests(os.path.join(val_dir, "val"))
    assert not set(file_digests(os.path.join(test_dir, "test")).values()) & set(val.values())

    # Cached: a second use generates nothing; a corrupt file is regenerated.
    monkeypatch.setattr(shapes, "_generate_split", lambda *a: pytest.fail("regenerated"))
    assert len(DatasetCatalog.get(SHAPES_TEST_DATASET)) == 4
    monkeypatch.undo()
    monkeypatch.setattr(shapes, "SHAPES_TEST_SIZE", 4)
    with open(os.path.join(test_dir, "test", "000001.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    assert len(DatasetCatalog.get(SHAPES_TEST_DATASET)) == 4
    assert shapes._cache_problem(test_dir, shapes._params({"test": 4}, 0)) is None


def test_a_stream_never_reuses_the_dataset_splits(tmp_path):
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="is a split of the revdet_shapes datasets"):
            shapes.ensure_shapes_stream(split, 2, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_fixed_training_batch_is_the_same_batch_every_time(shapes_registered):
    ensure_shapes_dataset(shapes_registered, num_train=3, num_val=1)
    cfg = yacs_cfg(DEMO_YAML)
    np.random.seed(5)
    expected_next = np.random.rand()
    np.random.seed(5)
    first = fixed_training_batch(cfg, 2)
    assert np.random.rand() == expected_next  # numpy's global RNG is left as it was
    second = fixed_training_batch(cfg, 2)
    assert [d["file_name"] for d in first] == [d["file_name"] for d in second]
    assert len(first) == 2 and all(d["instances"].has("gt_masks") for d in first)
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"])
