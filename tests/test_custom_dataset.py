"""Your own COCO-format dataset by name, without code: DATASETS.COCO_INSTANCES (yacs) and
train.coco_instances (LazyConfig) register it in both entry points, which then train on it and
evaluate on it with the COCO evaluator."""

import json
import os

import numpy as np
import pytest
from helpers import DEMO_LAZY, DEMO_YAML, TINY_LAZY, TINY_YACS, copypaste_ap, run
from PIL import Image

from rev_det.data import register_coco_datasets


def coco_dataset(root, n=4, size=160):
    """``n`` images with a bright rectangle (class "box") and a dark one (class "bar") each,
    polygons in COCO's json."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, annotations = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = rng.integers(90, 140, (size, size, 3), dtype=np.uint8)
        boxes = [(10 + 3 * i, 20, 70, 60, 1, 250), (80, 90 - 2 * i, 50, 40, 2, 10)]
        for x, y, w, h, category, value in boxes:
            pixels[y : y + h, x : x + w] = value
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append(
                dict(id=len(annotations) + 1, image_id=i + 1, category_id=category, iscrowd=0,
                     bbox=[x, y, w, h], area=w * h, segmentation=[polygon])
            )  # fmt: skip
        name = f"img{i}.png"
        Image.fromarray(pixels).save(os.path.join(root, "images", name))
        images.append(dict(id=i + 1, file_name=name, width=size, height=size))
    categories = [dict(id=1, name="box"), dict(id=2, name="bar")]
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(dict(images=images, annotations=annotations, categories=categories), f)
    return path, os.path.join(root, "images")


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_both_entry_points_train_and_evaluate_my_coco_json_by_name(entry, tmp_path):
    json_file, images = coco_dataset(str(tmp_path / "mine"))
    out = str(tmp_path / "out")
    if entry == "yacs":
        script, args = "train_net.py", ["--config-file", DEMO_YAML, *TINY_YACS]
        args += ["DATASETS.COCO_INSTANCES", f"[['mine', '{json_file}', '{images}']]"]
        args += ["DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "('mine',)"]
        args += ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "INPUT.MASK_FORMAT", "polygon"]
        args += ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out]
    else:
        script, args = "lazyconfig_train_net.py", ["--config-file", DEMO_LAZY, *TINY_LAZY]
        args += [f"train.coco_instances=[[mine,{json_file},{images}]]"]
        args += ["dataloader.train.dataset.names=mine", "dataloader.test.dataset.names=mine"]
        args += [
            "model.roi_heads.num_classes=2",
            "dataloader.train.mapper.instance_mask_format=polygon",
        ]
        args += ["dataloader.test.mapper.instance_mask_format=polygon"]
        args += ["train.max_iter=2", "lr_multiplier.scheduler.milestones=[1]"]
        args += [f"train.output_dir={out}"]
    log = run(script, args, str(tmp_path / "datasets"))
    assert set(copypaste_ap(log)) == {"bbox", "segm"}  # evaluated on "mine" with its json
    assert os.path.isfile(os.path.join(out, "model_final.pth"))


def test_bad_entries_and_a_truncated_json_are_named(tmp_path):
    json_file, images = coco_dataset(str(tmp_path / "mine"), n=1)
    key = "DATASETS.COCO_INSTANCES"
    with pytest.raises(ValueError, match=r"is not \[name, json_file, image_root\]"):
        register_coco_datasets([["mine", json_file]], key)
    with pytest.raises(ValueError, match="no json file"):
        register_coco_datasets([["mine", str(tmp_path / "none.json"), images]], key)
    with pytest.raises(ValueError, match="already registered for other data"):
        register_coco_datasets([["coco_2017_train", json_file, images]], key)
    register_coco_datasets([["mine_ok", json_file, images]], key)
    register_coco_datasets([["mine_ok", json_file, images]], key)  # again: the same, accepted
    from detectron2.data import DatasetCatalog, MetadataCatalog

    assert len(DatasetCatalog.get("mine_ok")) == 1
    assert MetadataCatalog.get("mine_ok").thing_classes == ["box", "bar"]
    truncated = str(tmp_path / "truncated.json")
    with open(truncated, "w") as f:
        f.write(open(json_file).read()[:50])
    register_coco_datasets([["mine_cut", truncated, images]], key)
    with pytest.raises(ValueError, match=r"truncated.json is not valid JSON.*truncated\?"):
        DatasetCatalog.get("mine_cut")
