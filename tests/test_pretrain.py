"""Trunk pretraining (rev_det.demo.pretrain, tools/pretrain_trunk.py) and shipped weights
(model_zoo)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

import rev_det
from rev_det import model_zoo
from rev_det.checkpoint import AtomicCheckpointer
from rev_det.data import SHAPES_CATEGORIES, draw_shapes_sample, ensure_shapes_dataset
from rev_det.demo.pretrain import (
    IGNORE,
    PretrainSchedule,
    ShapesPretrainHead,
    ShapesSegmentation,
    build_head,
    detector_trunk,
    pretrain,
)
from rev_det.utils import sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_YAML = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.yaml")
SCRATCH_YAML = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo_scratch.yaml")
DEMO_WEIGHTS = "rev_det://demo/rev_vit_demo_trunk.pth"
# The demo's trunk shrunk to seconds per run.
TINY_TRUNK = [
    "MODEL.REVVIT.EMBED_DIM", "48", "MODEL.REVVIT.DEPTH", "2",
    "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", "[0]",
]  # fmt: skip
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def demo_cfg(config_file=DEMO_YAML, opts=()):
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def test_pretrain_stream_refuses_the_dataset_splits_and_draws_other_images(tmp_path):
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="split of the revdet_shapes datasets"):
            draw_shapes_sample(split, 0)
    image, objects = draw_shapes_sample("pretrain", 0)
    again, _ = draw_shapes_sample("pretrain", 0)
    assert np.array_equal(np.asarray(image), np.asarray(again))  # deterministic
    assert objects and {o["category_id"] for o in objects} <= {c["id"] for c in SHAPES_CATEGORIES}
    root = str(tmp_path)
    ensure_shapes_dataset(root, num_train=4, num_val=4)
    from PIL import Image

    for split in ("train", "val"):
        for i in range(4):
            path = os.path.join(root, "revdet_shapes", split, f"{i:06d}.jpg")
            dataset_image = np.asarray(Image.open(path).convert("RGB"))
            for j in range(4):
                pretrain_image = np.asarray(draw_shapes_sample("pretrain", j)[0])
                assert dataset_image.shape != pretrain_image.shape or not np.array_equal(
                    dataset_image, pretrain_image
                )


def test_segmentation_items_are_normalised_crops_with_cell_labels():
    data = ShapesSegmentation(8, 128, MEAN, STD, "RGB", scales=(96,))
    for i in range(8):
        item = data[i]
        assert item["image"].shape == (3, 128, 128)
        assert item["labels"].shape == (32, 32)
        labels = item["labels"]
        assert labels.min() >= IGNORE and labels.max() <= len(SHAPES_CATEGORIES)
        # Short side 96 < crop 128: the rest is padding, labelled IGNORE and zero after
        # normalisation (as ImageList pads normalised images).
        assert (labels == IGNORE).any()
        padded = item["image"].abs().sum(0) == 0
        assert padded[::4, ::4][labels == IGNORE].float().mean() > 0.9
        assert (labels > 0).any()  # every image has a shape
        # Instances and classes describe the same cells as labels.
        instances, classes = item["instances"], item["classes"]
        assert torch.equal(instances == IGNORE, labels == IGNORE)
        assert torch.equal(instances == 0, labels == 0)
        shape = instances > 0
        assert torch.equal(classes[instances[shape] - 1], labels[shape])
        in_crop = set(instances[shape].tolist())
        assert {k + 1 for k in range(len(classes)) if classes[k] > 0} == in_crop
    with pytest.raises(ValueError, match="multiple of 4"):
        ShapesSegmentation(1, 30, MEAN, STD)


class _CrashAt(torch.utils.data.Dataset):
    """``data`` whose items from ``at`` on raise: a run that dies mid-way."""

    def __init__(self, data, at):
        self.data, self.at = data, at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        if index >= self.at:
            raise RuntimeError("killed")
        return self.data[index]


def _tiny_trunk(seed=0):
    from detectron2.modeling import build_backbone

    torch.manual_seed(seed)
    return detector_trunk(build_backbone(demo_cfg(opts=TINY_TRUNK)))[1]


def test_pretraining_resumes_exactly_and_refuses_a_changed_schedule(tmp_path):
    schedule = PretrainSchedule(iterations=4, batch_size=2, lr=1e-3, warmup=1, crop=64)
    data = ShapesSegmentation(8, 64, MEAN, STD, scales=(64,))
    whole = _tiny_trunk()
    result = pretrain(whole, data, schedule, str(tmp_path / "whole"), num_workers=0)
    assert np.isfinite(result["loss"]) and 0.0 <= result["accuracy"] <= 1.0
    assert any(
        not torch.equal(a, b) for a, b in zip(whole.parameters(), _tiny_trunk().parameters())
    )

    # Dies in step 3 after the checkpoint of step 2; resumed from a differently seeded trunk
    # and global RNG: the same weights as the uninterrupted run, bit for bit.
    out = str(tmp_path / "parts")
    with pytest.raises(RuntimeError, match="killed"):
        pretrain(
            _tiny_trunk(), _CrashAt(data, 4), schedule, out, checkpoint_period=2, num_workers=0
        )
    resumed = _tiny_trunk(seed=123)
    pretrain(resumed, data, schedule, out, resume=True, num_workers=0)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    changed = PretrainSchedule(**{**vars(schedule), "lr": 2e-3})
    with pytest.raises(ValueError, match="resume with the same settings"):
        pretrain(_tiny_trunk(), data, changed, out, resume=True, num_workers=0)
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain(_tiny_trunk(), data, schedule, out, num_workers=0)
    with pytest.raises(ValueError, match="need 16"):
        pretrain(_tiny_trunk(), data, PretrainSchedule(iterations=8, batch_size=2), out)


def test_a_further_stage_starts_from_the_earlier_runs_trunk_and_head(tmp_path):
    data = ShapesSegmentation(8, 64, MEAN, STD, scales=(64,))
    first = _tiny_trunk()
    schedule = PretrainSchedule(iterations=2, batch_size=2, lr=1e-3, warmup=1, crop=64)
    pretrain(first, data, schedule, str(tmp_path / "first"), num_workers=0)
    state = torch.load(tmp_path / "first" / "pretrain_last.pth", weights_only=True)

    # With a learning rate too small to move a weight, the stage ends where the first run did.
    still = PretrainSchedule(iterations=1, batch_size=2, lr=1e-20, warmup=0, crop=64, seed=1)
    stage = _tiny_trunk(seed=123)
    head = build_head(stage)
    init = str(tmp_path / "first" / "pretrain_last.pth")
    pretrain(stage, data, still, str(tmp_path / "stage"), num_workers=0, head=head, init=init)
    # (Parameters only: the stem's batch-norm statistics move in any training forward.)
    for (name, a), b in zip(first.named_parameters(), stage.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=name)
    for name, value in head.named_parameters():
        torch.testing.assert_close(value, state["head"][name], rtol=0, atol=1e-12, msg=name)
    assert torch.load(tmp_path / "stage" / "pretrain_last.pth")["schedule"]["seed"] == 1


def test_pretrain_tool_exports_a_trunk_that_loads_strictly_into_the_detector(tmp_path):
    """tools/pretrain_trunk.py end to end; its float16 export loads with STRICT_LOAD."""
    export = str(tmp_path / "trunk.pth")
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "pretrain_trunk.py"),
        "--config-file", DEMO_YAML, "--output-dir", str(tmp_path / "run"), "--export", export,
        "--half", "--iterations", "3", "--batch-size", "2", "--crop", "64", "--warmup", "1",
        "--num-workers", "0", "--log-period", "1", *TINY_TRUNK,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretrain step 3/3" in proc.stdout + proc.stderr
    assert "eta" in proc.stdout + proc.stderr  # progress with the remaining time

    saved = torch.load(export, map_location="cpu", weights_only=True)
    assert saved["rev_det"]["schedule"]["iterations"] == 3
    assert all(k.startswith("backbone.net.") for k in saved["model"])
    assert all(v.dtype == torch.float16 for v in saved["model"].values() if v.is_floating_point())
    cfg = demo_cfg(opts=TINY_TRUNK + ["MODEL.WEIGHTS", export])
    model = build_model(cfg)
    AtomicCheckpointer(model, strict_load=True).load(export)
    trunk = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.net.")}
    assert trunk.keys() == saved["model"].keys()
    # The stem's batch norms were learnt (trainable in pretraining) and are frozen in the detector.
    assert isinstance(model.backbone.net.patch_embed.stem[1], FrozenBatchNorm2d)
    assert not torch.equal(model.backbone.net.patch_embed.stem[1].running_var, torch.ones(24))
    for key, value in trunk.items():
        assert torch.equal(value, saved["model"][key].to(value.dtype)), key


def test_shipped_demo_trunk_loads_strictly_into_the_demo_config():
    cfg = demo_cfg()
    assert cfg.MODEL.WEIGHTS == DEMO_WEIGHTS and cfg.MODEL.REV.STRICT_LOAD
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    AtomicCheckpointer(model, strict_load=True).load(cfg.MODEL.WEIGHTS)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    trunk = {k for k in before if k.startswith("backbone.net.")}
    assert trunk <= changed  # every trunk weight came from the file
    assert not any(k.startswith("roi_heads.") for k in changed)
    provenance = torch.load(model_zoo.weight_path(DEMO_WEIGHTS), weights_only=True)["rev_det"]
    assert provenance["command"].startswith("python tools/pretrain_trunk.py")


def test_scratch_demo_config_is_the_demo_without_the_pretrained_trunk():
    demo, scratch = demo_cfg(), demo_cfg(SCRATCH_YAML)
    assert scratch.MODEL.WEIGHTS == "" and not scratch.MODEL.REV.STRICT_LOAD
    assert scratch.OUTPUT_DIR != demo.OUTPUT_DIR
    assert scratch.SOLVER.MAX_ITER == demo.SOLVER.MAX_ITER  # the same fine-tuning budget
    # The same trunk, but for the stem's norms: frozen under pretrained weights, learnt from scratch.
    assert (demo.MODEL.REVVIT.STEM_NORM, scratch.MODEL.REVVIT.STEM_NORM) == ("FrozenBN", "BN")
    scratch.MODEL.REVVIT.STEM_NORM = "FrozenBN"
    assert scratch.MODEL.REVVIT == demo.MODEL.REVVIT


@pytest.fixture
def fake_weights(tmp_path, monkeypatch):
    path = tmp_path / "w.pth"
    path.write_bytes(b"weights")
    monkeypatch.setattr(model_zoo, "_WEIGHTS_DIR", str(tmp_path))
    entry = model_zoo.WeightFile("w.pth", sha256_file(str(path)), "python make_w.py")
    monkeypatch.setitem(model_zoo.WEIGHTS, "test/w.pth", entry)
    return path


def test_model_zoo_checks_the_file_and_names_the_command_that_rebuilds_it(fake_weights):
    from detectron2.utils.file_io import PathManager

    assert PathManager.get_local_path("rev_det://test/w.pth") == str(fake_weights)
    fake_weights.write_bytes(b"weightz")  # same size, other bytes
    with pytest.raises(RuntimeError, match="corrupt or was replaced.*python make_w.py"):
        PathManager.get_local_path("rev_det://test/w.pth")
    fake_weights.unlink()
    with pytest.raises(FileNotFoundError, match="is missing.*python make_w.py"):
        PathManager.get_local_path("rev_det://test/w.pth")
    with pytest.raises(KeyError, match="known: .*rev_det://test/w.pth"):
        PathManager.get_local_path("rev_det://test/nothing.pth")


def test_a_corrupt_shipped_trunk_stops_training_before_it_starts(fake_weights, tmp_path):
    """Through the checkpointer, as MODEL.WEIGHTS is loaded: the error, not a random init."""
    fake_weights.write_bytes(b"truncated")
    model = build_model(demo_cfg(opts=TINY_TRUNK))
    with pytest.raises(RuntimeError, match="python make_w.py"):
        AtomicCheckpointer(model, strict_load=True).load("rev_det://test/w.pth")


@pytest.mark.slow
def test_demo_fine_tunes_from_the_shipped_trunk_through_train_net(tmp_path):
    """The demo as `make demo` runs it (full-size model, pretrained trunk), a few iterations."""
    root = str(tmp_path / "datasets")
    ensure_shapes_dataset(root, num_train=8, num_val=2)
    out = str(tmp_path / "out")
    opts = ["SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "projects", "train_net.py"),
         "--config-file", DEMO_YAML, *opts, "OUTPUT_DIR", out],
        cwd=ROOT, env=dict(os.environ, DETECTRON2_DATASETS=root),
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"Loading from {DEMO_WEIGHTS}" in log
    n_trunk = sum(k.startswith("backbone.net.") for k in build_model(demo_cfg()).state_dict())
    loaded = re.search(r"Loaded (\d+) of the model's (\d+) weights", log)
    assert loaded and int(loaded.group(1)) == n_trunk, log[-4000:]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert "copypaste: Task: segm" in log


def test_object_head_classifies_the_mean_feature_of_each_objects_cells():
    torch.manual_seed(0)
    head = ShapesPretrainHead(4, len(SHAPES_CATEGORIES), upsample=2)
    x = torch.randn(1, 4, 3, 3)
    instances = torch.zeros(1, 6, 6, dtype=torch.int64)
    instances[0, :2, :2] = 1  # trunk cell (0, 0)
    instances[0, 4:, 2:] = 2  # trunk cells (2, 1) and (2, 2)
    instances[0, 0, 5] = 3  # a quarter of trunk cell (0, 2)
    dense, objects = head(x, instances)
    assert dense.shape == (1, len(SHAPES_CATEGORIES) + 1, 6, 6)
    expected = [x[0, :, 0, 0], x[0, :, 2, 1:].mean(-1), x[0, :, 0, 2]]
    for k, feature in enumerate(expected):
        torch.testing.assert_close(objects[0, k], head.classify(feature))
