"""rev_det.checks: the bad inputs of issue 16, each ending in a clear error or a counted warning.

Configs, overrides, weight files, dataset boxes and categories, image files, the output
directory (lock, stale lock, stale temporary files), divergence, and the converter's input and
output files. The entry points are run end to end where only they can show it (slow).
"""

import errno
import io
import json
import logging
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.structures import BoxMode
from helpers import DEMO_LAZY, DEMO_MVIT, DEMO_YAML
from helpers import LAZY as LAZY_CONFIGS
from helpers import ROOT, TINY_LAZY, TINY_YACS
from helpers import YACS as YACS_CONFIGS
from helpers import load_entry_point, load_script, run_entry, tiny_cfg, yacs_cfg
from PIL import Image

from rev_det.checkpoint import atomic_open
from rev_det.checks import (
    LAZY,
    AnnotationSummary,
    CheckedMapper,
    OutputDirInUseError,
    OutputDirLock,
    check_lazy_config,
    check_lazy_overrides,
    check_num_classes,
    check_weights_file,
    check_yacs_config,
    checkpoint_file_problem,
    complete_lazy_config,
    divergence_advice,
    largest_image_side,
    scan_annotations,
)
from rev_det.data import build_resumable_train_loader
from rev_det.reversible import ReconstructionError

DEMO_MVIT_LAZY = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_mvit_demo.py")


def lazy_cfg(path=DEMO_LAZY, *overrides):
    cfg = LazyConfig.load(path)
    complete_lazy_config(cfg)
    check_lazy_overrides(cfg, list(overrides))
    return LazyConfig.apply_overrides(cfg, list(overrides))


# ---------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("depth", [0, -1])
def test_depth_below_one_names_the_key(depth):
    # Without window blocks, such a trunk used to train with no blocks at all.
    with pytest.raises(ValueError, match=rf"MODEL.REVVIT.DEPTH = {depth}: .* at least 1 block"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REVVIT.DEPTH", depth))
    with pytest.raises(ValueError, match=rf"MODEL.REVVIT.DEPTH = {depth}"):
        check_yacs_config(
            yacs_cfg(
                DEMO_YAML, "MODEL.REVVIT.DEPTH", depth, "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", []
            )
        )
    with pytest.raises(ValueError, match=rf"model.backbone.net.depth = {depth}"):
        check_lazy_config(lazy_cfg(DEMO_LAZY, f"model.backbone.net.depth={depth}"))
    with pytest.raises(ValueError, match="MODEL.REVMVIT.DEPTH = 3: .* at least 4 blocks"):
        check_yacs_config(yacs_cfg(DEMO_MVIT, "MODEL.REVMVIT.DEPTH", 3))
    with pytest.raises(ValueError, match="depth must be at least 1"):
        from rev_det.modeling import RevViT

        RevViT(depth=0)


def test_window_larger_than_the_token_grid_is_refused_before_building():
    # The demo's largest image side is 352 (INPUT.MAX_SIZE_TRAIN/TEST), padded to 384: 24
    # tokens at stride 16.
    with pytest.raises(ValueError, match=r"MODEL.REVVIT.WINDOW_SIZE = 1000 .* 24 x 24 tokens"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REVVIT.WINDOW_SIZE", 1000))
    check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REVVIT.WINDOW_SIZE", 24))  # the whole grid: fine
    with pytest.raises(ValueError, match="at most 512 pixels a side .*MODEL.REV.SQUARE_PAD"):
        check_yacs_config(
            yacs_cfg(DEMO_YAML, "MODEL.REV.SQUARE_PAD", 512, "MODEL.REVVIT.WINDOW_SIZE", 40)
        )
    with pytest.raises(ValueError, match=r"MODEL.REVMVIT.ADAPTIVE_WINDOW_SIZE = 1000 .* 96 x 96"):
        check_yacs_config(yacs_cfg(DEMO_MVIT, "MODEL.REVMVIT.ADAPTIVE_WINDOW_SIZE", 1000))
    # LazyConfig: the bound comes from the loaders' augmentations (ResizeShortestEdge 352).
    with pytest.raises(ValueError, match=r"model.backbone.net.window_size = 1000 .* 24 x 24"):
        check_lazy_config(lazy_cfg(DEMO_LAZY, "model.backbone.net.window_size=1000"))
    with pytest.raises(ValueError, match="adaptive_window_size = 512"):
        check_lazy_config(lazy_cfg(DEMO_MVIT_LAZY, "model.backbone.net.adaptive_window_size=512"))
    check_lazy_config(lazy_cfg(DEMO_LAZY))
    check_lazy_config(lazy_cfg(DEMO_MVIT_LAZY))


@pytest.mark.parametrize("path", YACS_CONFIGS + LAZY_CONFIGS, ids=os.path.basename)
def test_every_shipped_config_passes_the_checks(path):
    if path.endswith(".py"):
        check_lazy_config(lazy_cfg(path))
    else:
        check_yacs_config(yacs_cfg(path))


def test_largest_image_side_follows_the_resize_and_crop_augmentations():
    import detectron2.data.transforms as T

    assert largest_image_side([T.ResizeShortestEdge(800, 1333), T.RandomFlip()]) == 1333
    assert largest_image_side([T.ResizeShortestEdge(800)]) is None  # the long side is unbounded
    assert largest_image_side([T.RandomFlip()]) is None
    lsj = [T.ResizeScale(0.1, 2.0, 1024, 1024), T.FixedSizeCrop((1024, 1024))]
    assert largest_image_side(lsj[:1]) == 2048 and largest_image_side(lsj) == 1024
    assert largest_image_side([T.Resize((600, 900))]) == 900


def test_window_block_indexes_and_window_size_errors_name_their_keys():
    with pytest.raises(ValueError, match=r"MODEL.REVVIT.WINDOW_BLOCK_INDEXES lists blocks \[6\]"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", [0, 6]))
    with pytest.raises(ValueError, match="MODEL.REVVIT.WINDOW_SIZE = 0 but .*WINDOW_BLOCK_INDEX"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REVVIT.WINDOW_SIZE", 0))


def test_reconstruction_period_lr_and_classes_name_their_keys():
    with pytest.raises(ValueError, match="MODEL.REV.CHECK_RECONSTRUCTION.PERIOD = -1"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REV.CHECK_RECONSTRUCTION.PERIOD", -1))
    with pytest.raises(ValueError, match="MODEL.REV.CHECK_RECONSTRUCTION.THRESHOLD = 0.0"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REV.CHECK_RECONSTRUCTION.THRESHOLD", 0.0))
    with pytest.raises(ValueError, match="train.check_reconstruction.period = -1"):
        check_lazy_config(lazy_cfg(DEMO_LAZY, "train.check_reconstruction.period=-1"))
    with pytest.raises(ValueError, match="SOLVER.BASE_LR = -0.1"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "SOLVER.BASE_LR", -0.1))
    with pytest.raises(ValueError, match="optimizer.lr = nan"):
        check_lazy_config(lazy_cfg(DEMO_LAZY, "optimizer.lr=nan"))
    short = lazy_cfg(DEMO_LAZY, "train.max_iter=100")  # the demo's milestones are beyond it
    milestones = list(short.lr_multiplier.scheduler.milestones)
    assert min(milestones) > 100
    with pytest.raises(
        ValueError, match=re.escape(f"milestones = {milestones}") + " .*num_updates = 100"
    ):
        check_lazy_config(short)
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES = 0"):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.ROI_HEADS.NUM_CLASSES", 0))
    # The hook itself, built directly, names both keys.
    from rev_det.training import ReconstructionCheck

    with pytest.raises(ValueError, match="MODEL.REV.CHECK_RECONSTRUCTION.PERIOD"):
        ReconstructionCheck(period=-1)


def test_lazy_override_of_a_new_key_names_the_closest_one():
    cfg = LazyConfig.load(DEMO_LAZY)
    complete_lazy_config(cfg)
    with pytest.raises(KeyError, match=r"train.max_itr is not a key.*did you mean train.max_iter"):
        check_lazy_overrides(cfg, ["train.max_itr=2"])
    with pytest.raises(KeyError, match="did you mean model.backbone.net.window_size"):
        check_lazy_overrides(cfg, ["model.backbone.net.windw_size=4"])
    with pytest.raises(KeyError, match="augmentations is a list of 2 items"):
        check_lazy_overrides(cfg, ["dataloader.train.mapper.augmentations.2.prob=1"])
    # Existing keys, arguments the config leaves at their defaults, rev_det's optional train
    # keys, and keys added on purpose with '+'.
    check_lazy_overrides(
        cfg,
        [
            "train.max_iter=2",
            "model.backbone.net.patch_size=8",  # an argument of RevViT not set in the config
            "train.strict_load=True",
            "train.check_reconstruction.period=5",
            "train.amp.precision=bfloat16",
            "+train.note=x",
            "dataloader.train.mapper.augmentations.0.max_size=300",
        ],
    )


# ---------------------------------------------------------------------------------- weights


def weight_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    data = good.read_bytes()
    files = {
        "empty": (b"", "is empty"),
        "text": (b"<html>404 Not Found</html>\n", "is a text file"),
        "random": (
            np.random.default_rng(0).bytes(4096),
            "is neither a zip archive .* nor a pickle",
        ),
        "truncated": (data[: len(data) // 2], "is a damaged or truncated zip archive"),
        "lfs": (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\n",
            "is a Git LFS pointer.*git lfs pull",
        ),
    }
    for name, (content, _) in files.items():
        (tmp_path / f"{name}.pth").write_bytes(content)
    return good, {
        name: (str(tmp_path / f"{name}.pth"), match) for name, (_, match) in files.items()
    }


def test_weight_files_that_are_no_checkpoint_are_named(tmp_path):
    good, bad = weight_files(tmp_path)
    for path, match in bad.values():
        with pytest.raises(ValueError, match=f"MODEL.WEIGHTS = '{path}': the file {match}"):
            check_weights_file(path)
        with pytest.raises(ValueError, match="train.init_checkpoint"):
            check_weights_file(path, LAZY)
    assert checkpoint_file_problem(str(tmp_path)) == "is a directory, not a checkpoint file"
    # Checkpoints: torch.save's zip and a plain pickle (Detectron2's model-zoo .pkl).
    pkl = tmp_path / "zoo.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": np.zeros(3)}, "__author__": "zoo"}))
    for path in (good, pkl):
        assert checkpoint_file_problem(str(path)) is None
        check_weights_file(str(path))
    check_weights_file(str(tmp_path / "missing.pth"))  # the loader names missing files
    check_weights_file("detectron2://ImageNetPretrained/MSRA/R-50.pkl")


# --------------------------------------------------------------------------------------- data


def dataset_dict(image_id, boxes, mode=BoxMode.XYWH_ABS, category=0, size=(100, 120)):
    annotations = [dict(bbox=b, bbox_mode=mode, category_id=category, iscrowd=0) for b in boxes]
    return dict(
        file_name=f"{image_id}.jpg",
        image_id=image_id,
        height=size[0],
        width=size[1],
        annotations=annotations,
    )


def test_boxes_detectron2_drops_are_counted_in_a_warning(caplog):
    dicts = [
        dataset_dict(0, [[10, 10, 20, 20], [10, 10, 0, 5], [10, 10, 5, 0]]),
        dataset_dict(1, [[130, 10, 5, 5], [-20, 10, 10, 10], [110, 90, 30, 30]]),
        dataset_dict(2, [[5, 5, 30, 30]], mode=BoxMode.XYXY_ABS, category=3),
    ]
    dicts[2]["annotations"].append(dict(bbox=[0, 0, -5, 5], category_id=0, iscrowd=1))  # crowd
    with caplog.at_level(logging.WARNING, logger="rev_det.checks"):
        summary = scan_annotations(dicts)
    assert summary.boxes == 7
    assert summary.categories == {0: 6, 3: 1}
    assert summary.dropped == {
        "of zero width or height": 2,
        "entirely outside their 120x100 image": 2,
    }
    text = caplog.text
    assert "2 of the 7 boxes are of zero width or height" in text
    assert "2 of the 7 boxes are entirely outside" in text and "image_id 1" in text


@pytest.mark.parametrize(
    "bbox, mode",
    [([10, 10, -5, 20], BoxMode.XYWH_ABS), ([30, 10, 20, 40], BoxMode.XYXY_ABS)],
)
def test_negative_size_boxes_are_an_error(bbox, mode):
    dicts = [dataset_dict(0, [[1, 1, 5, 5]]), dataset_dict(7, [bbox], mode=mode)]
    with pytest.raises(ValueError, match=r"1 annotations .*negative.*image_id 7 \(7.jpg\)"):
        scan_annotations(dicts, ["my_train"])
    with pytest.raises(ValueError, match="negative"):
        build_resumable_train_loader(dicts, mapper=lambda d: d, total_batch_size=1)


def test_more_categories_than_num_classes_is_an_error_before_training(caplog):
    summary = AnnotationSummary(boxes=3, categories={0: 1, 9: 2})
    with pytest.raises(
        ValueError, match=r"10 categories \(category ids up to 9.*NUM_CLASSES = 6.*to 10"
    ):
        check_num_classes(summary, ["my_train"], 6)
    with pytest.raises(ValueError, match="model.roi_heads.num_classes = 6"):
        check_num_classes(summary, ["my_train"], 6, LAZY)
    with caplog.at_level(logging.WARNING, logger="rev_det.checks"):
        check_num_classes(summary, ["my_train"], 12)
    assert "the other 2 classifier outputs are never trained" in caplog.text
    # The metadata's thing_classes count too.
    MetadataCatalog.get("revdet_test_classes").thing_classes = list("abcdefgh")
    try:
        with pytest.raises(ValueError, match="8 thing_classes in revdet_test_classes"):
            check_num_classes(AnnotationSummary(), ["revdet_test_classes"], 6)
    finally:
        MetadataCatalog.remove("revdet_test_classes")


def test_trainer_refuses_a_dataset_with_more_categories_than_classes(tmp_path):
    path = str(tmp_path / "0.jpg")
    Image.new("RGB", (64, 48)).save(path)
    d = dataset_dict(0, [[5, 5, 20, 20]], category=8, size=(48, 64))
    d["file_name"] = path
    DatasetCatalog.register("revdet_test_nine", lambda: [d])
    try:
        cfg = tiny_cfg("DATASETS.TRAIN", ("revdet_test_nine",), "OUTPUT_DIR", str(tmp_path))
        with pytest.raises(ValueError, match=r"\(revdet_test_nine\) has 9 categories"):
            load_entry_point("train_net").Trainer(cfg)
    finally:
        DatasetCatalog.remove("revdet_test_nine")


@pytest.fixture
def mapper():
    return CheckedMapper(DatasetMapper(tiny_cfg("INPUT.MIN_SIZE_TEST", 0), is_train=False))


def test_unreadable_image_files_are_named(tmp_path, mapper):
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8)).save(
        jpeg, "JPEG"
    )
    files = {
        "truncated.jpg": (jpeg.getvalue()[:-400], "damaged or truncated"),
        "empty.jpg": (b"", "it is an empty file"),
        "text.jpg": (b"not an image\n", "not an image file PIL can read"),
    }
    for name, (content, match) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(OSError, match=f"Cannot read image {path} .*{match}"):
            mapper({"file_name": str(path), "image_id": name, "height": 64, "width": 80})
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg.getvalue())
    out = mapper({"file_name": str(good), "image_id": 0, "height": 64, "width": 80})
    assert out["image"].shape == (3, 64, 80)


def test_an_image_too_large_for_pil_is_named(tmp_path, mapper, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 48)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3072 pixels: over twice the limit
    with pytest.raises(OSError, match=f"Image {path} .*larger than PIL opens.*MAX_IMAGE_PIXELS"):
        mapper({"file_name": str(path), "image_id": 1, "height": 48, "width": 64})


def test_16_bit_png_is_refused_not_trained_as_white(tmp_path, mapper):
    path = tmp_path / "depth.png"
    pixels = np.random.default_rng(0).integers(256, 65536, (48, 64), dtype=np.uint16)
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode.startswith("I")  # what PIL reads it as
    # Unchecked, Detectron2 reads it as all white.
    raw = DatasetMapper(tiny_cfg("INPUT.MIN_SIZE_TEST", 0), is_train=False)
    assert (raw({"file_name": str(path), "height": 48, "width": 64})["image"] == 255).all()
    with pytest.raises(OSError, match=f"Image {path} .*mode 'I(;16)?'.*8 bits"):
        mapper({"file_name": str(path), "image_id": 3, "height": 48, "width": 64})


# --------------------------------------------------------------------------- output directory


def test_a_second_run_in_an_output_dir_is_refused_naming_the_running_one(tmp_path):
    out = str(tmp_path / "out")
    with OutputDirLock(out) as first:
        lock_file = os.path.join(out, "run.lock")
        assert json.loads(open(lock_file).read())["pid"] == os.getpid()
        # Another process tries the same directory.
        code = (
            "import sys; from rev_det.checks import OutputDirLock\n"
            f"OutputDirLock({out!r}, 'OUTPUT_DIR').acquire()"
        )
        env = dict(os.environ, PYTHONPATH=ROOT)
        other = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env
        )
        assert other.returncode != 0
        assert f"OUTPUT_DIR {out} is in use by another run: pid {os.getpid()}" in other.stderr
        assert "set OUTPUT_DIR to another directory" in other.stderr
        with pytest.raises(OutputDirInUseError):  # and in this process, through another file
            OutputDirLock(out).acquire()
        assert first.tidy() == []
    assert not os.path.exists(lock_file)  # released on exit
    with OutputDirLock(out) as again:  # finished: free again (e.g. for --resume)
        assert again.previous is None
    with OutputDirLock(out, enabled=False):  # other processes of a distributed run
        assert not os.path.exists(lock_file)


def test_stale_lock_and_temporary_files_of_a_killed_run_are_cleaned_up(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    # What a SIGKILLed run leaves: its lock file (no process holds it) and a half-written save.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True).stdout.strip()  # fmt: skip
    run = {"pid": int(dead), "host": "h", "started": "2026-11-29T10:00:00", "command": "x"}
    (out / "run.lock").write_text(json.dumps(run))
    (out / ".model_0000019.pth.0a1b2c3d.tmp").write_bytes(b"\0" * 2**20)
    (out / ".last_checkpoint.ffffffff.tmp").write_text("model_0000019.pth")
    keep = [".hidden.tmp", "model_0000009.pth", "notes.0a1b2c3d.tmp", ".x.0A1B2C3D.tmp"]
    for name in keep:
        (out / name).write_text("keep")
    with caplog.at_level(logging.WARNING, logger="rev_det.checks"), OutputDirLock(str(out)) as lock:
        assert lock.tidy() == [".last_checkpoint.ffffffff.tmp (0.0 MiB)",
                               ".model_0000019.pth.0a1b2c3d.tmp (1.0 MiB)"]  # fmt: skip
    assert f"did not end cleanly (pid {dead} on host h" in caplog.text
    assert "Removed 2 temporary files" in caplog.text
    assert sorted(os.listdir(out)) == sorted(keep)


def test_an_output_dir_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match=f"train.output_dir {blocker}/out cannot be written"):
        OutputDirLock(str(blocker / "out"), "train.output_dir").acquire()


# --------------------------------------------------------------------------------- divergence


class Trainer:
    iter = 7


def test_divergence_names_the_iteration_and_what_to_change():
    with pytest.raises(FloatingPointError) as failed:
        with divergence_advice(Trainer(), lr=1e6):
            raise FloatingPointError("Predicted boxes or scores contain Inf/NaN.")
    message = str(failed.value)
    assert message.startswith("Training diverged at iteration 7: Predicted boxes")
    assert "SOLVER.BASE_LR = 1e+06" in message and "lower SOLVER.BASE_LR" in message
    assert "SOLVER.WARMUP_ITERS" in message
    with pytest.raises(FloatingPointError, match="lower optimizer.lr"):
        with divergence_advice(Trainer(), LAZY):
            raise FloatingPointError("Loss became infinite or NaN at iteration=7!")
    # The reconstruction check's error has its own advice.
    with pytest.raises(ReconstructionError, match="^drift$"):
        with divergence_advice(Trainer()):
            raise ReconstructionError("drift")


# --------------------------------------------------------------------------------- converter


def load_tool():
    return load_script("tools", "convert_pretrained")


def test_converter_refuses_to_overwrite_its_input(tmp_path, monkeypatch, capsys):
    main = load_tool().main
    source = tmp_path / "in.pth"
    torch.save({"model": {"w": torch.zeros(3)}}, source)
    before = source.read_bytes()
    (tmp_path / "link.pth").symlink_to(source)
    os.link(source, tmp_path / "hard.pth")
    monkeypatch.chdir(tmp_path)
    for output in (str(source), "in.pth", "./sub/../in.pth", "link.pth", "hard.pth"):
        args = ["--source", "vit", "--input", str(source), "--output", output]
        assert main([*args, "--config-file", DEMO_YAML]) == 2
        assert "is the --input file" in capsys.readouterr().err
    assert source.read_bytes() == before


def test_converter_names_unreadable_inputs_without_useless_advice(tmp_path, capsys):
    main = load_tool().main
    _, bad = weight_files(tmp_path)
    bad["missing"] = (str(tmp_path / "missing.pth"), "does not exist")
    for path, match in bad.values():
        for trust in ([], ["--trust-pickle"]):
            args = ["--source", "vit", "--input", path, "--output", str(tmp_path / "o.pth")]
            assert main([*args, "--config-file", DEMO_YAML, *trust]) == 2
            err = capsys.readouterr().err
            assert f"--input {path}: the file" in err and "--trust-pickle" not in err, err
    # Where trusting the pickle does help, it is advised.
    pickled = tmp_path / "objects.pth"
    torch.save({"model": {"w": torch.zeros(3)}, "args": AnnotationSummary()}, pickled)
    args = ["--source", "vit", "--input", str(pickled), "--output", str(tmp_path / "o.pth")]
    assert main([*args, "--config-file", DEMO_YAML]) == 2
    assert "pass --trust-pickle" in capsys.readouterr().err
    assert not (tmp_path / "o.pth").exists()


# ------------------------------------------------------------------------- through the entry points


def entry_args(entry, out, *extra):
    if entry == "yacs":
        opts = TINY_YACS + ["OUTPUT_DIR", out] + [str(e) for e in extra]
        return "train_net.py", ["--config-file", DEMO_YAML, *opts]
    return "lazyconfig_train_net.py", ["--config-file", DEMO_LAZY, *TINY_LAZY, f"train.output_dir={out}", *extra]  # fmt: skip


@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_entry_points_refuse_bad_input_before_writing_anything(entry, tmp_path):
    out = str(tmp_path / "out")
    bad = {
        "yacs": [
            (["MODEL.REVVIT.DEPTH", "0"], "MODEL.REVVIT.DEPTH = 0"),
            (["MODEL.REVVIT.WINDOW_SIZE", "1000"], "MODEL.REVVIT.WINDOW_SIZE = 1000 is larger"),
            (["MODEL.REV.CHECK_RECONSTRUCTION.PERIOD", "-1"], "CHECK_RECONSTRUCTION.PERIOD = -1"),
            (["--resume"], "--resume comes after the config overrides"),
        ],
        "lazy": [
            (["train.max_itr=2"], "did you mean train.max_iter"),
            (["model.backbone.net.depth=-1"], "model.backbone.net.depth = -1"),
            (["train.check_reconstruction.period=-1"], "check_reconstruction.period = -1"),
        ],
    }[entry]
    for extra, message in bad:
        script, args = entry_args(entry, out, *extra)
        code, log = run_entry(script, args, str(tmp_path))
        assert code != 0 and message in log, log[-3000:]
        assert not os.path.exists(out)  # no config.yaml, no log: nothing written


# Two iterations (the tiny LazyConfig's lr milestone is at 30).
SHORT = {
    "yacs": ["SOLVER.MAX_ITER", 2],
    "lazy": ["train.max_iter=2", "lr_multiplier.scheduler.milestones=[1]"],
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_output_dir_lock_through_the_entry_points(entry, tmp_path, datasets_root):
    out = str(tmp_path / "out")
    # A running run (this process) holds the directory: the entry point refuses it.
    with OutputDirLock(out):
        script, args = entry_args(entry, out, *SHORT[entry])  # fmt: skip
        code, log = run_entry(script, args, datasets_root)
        assert code != 0
        assert f"{out} is in use by another run: pid {os.getpid()}" in log, log[-3000:]
        assert os.listdir(out) == ["run.lock"]  # its config.yaml and log were not written
    # A killed run's lock and half-written save: taken over and removed, with a log line.
    (tmp_path / "out" / "run.lock").write_text(json.dumps({"pid": 1, "host": "h", "started": "s", "command": "c"}))  # fmt: skip
    (tmp_path / "out" / ".model_0000019.pth.0a1b2c3d.tmp").write_bytes(b"\0" * 1000)
    code, log = run_entry(script, ["--resume", *args], datasets_root)
    assert code == 0, log[-3000:]
    with open(os.path.join(out, "log.txt")) as f:
        logged = f.read()
    assert "had a lock of a run that did not end cleanly (pid 1 on host h" in logged
    assert "Removed 1 temporary files" in logged and ".model_0000019.pth.0a1b2c3d.tmp" in logged
    assert "run.lock" not in os.listdir(out) and "model_final.pth" in os.listdir(out)


@pytest.mark.slow
def test_divergence_through_the_entry_point_names_iteration_and_advice(tmp_path, datasets_root):
    script, args = entry_args("yacs", str(tmp_path / "out"), "SOLVER.BASE_LR", "1e6", "SOLVER.MAX_ITER", 20)  # fmt: skip
    code, log = run_entry(script, args, datasets_root)
    assert code != 0
    assert re.search(r"FloatingPointError: Training diverged at iteration \d+: ", log), log[-3000:]
    assert "lower SOLVER.BASE_LR" in log


def test_a_full_disk_while_saving_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "model_final.pth"
    path.write_text("previous")
    # torch.save reports a failed write as a RuntimeError raised while handling the OSError.
    with pytest.raises(OSError, match=f"Cannot write {path}: the file system is full") as failed:
        with atomic_open(str(path)) as f:
            f.write(b"partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    assert failed.value.errno == errno.ENOSPC
    assert path.read_text() == "previous" and os.listdir(tmp_path) == ["model_final.pth"]
    # Other errors pass unchanged.
    with pytest.raises(ValueError, match="^bad data$"):
        with atomic_open(str(path)):
            raise ValueError("bad data")


def test_an_output_dir_made_read_only_while_training_names_the_save_not_the_lock(
    tmp_path, monkeypatch, caplog
):
    """A directory made read-only while a run trains (chmod a-w; simulated: this suite may run
    as root, whom permissions do not stop): the failed checkpoint save is the error, naming the
    file and the fix; releasing the lock then cannot remove run.lock, which is logged, not
    raised over the save's error."""
    out = tmp_path / "out"
    real_open, real_unlink = os.open, os.unlink

    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def read_only_open(path, flags, *args):
        if str(path).startswith(str(out)) and flags & os.O_CREAT:
            denied(path)
        return real_open(path, flags, *args)

    def read_only_unlink(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            denied(path)
        return real_unlink(path, *args, **kwargs)

    error = r"Cannot write .*last_checkpoint: permission denied"
    with caplog.at_level(logging.WARNING, logger="rev_det.checks"), pytest.raises(
        OSError, match=error
    ):
        with OutputDirLock(str(out)):
            monkeypatch.setattr(os, "open", read_only_open)
            monkeypatch.setattr(os, "unlink", read_only_unlink)
            with atomic_open(str(out / "last_checkpoint"), "w") as f:
                f.write("model_0000099.pth")
    assert "Could not remove" in caplog.text and "run.lock" in caplog.text
    monkeypatch.undo()
    # The lock ended with the run: the next run takes the directory over.
    with OutputDirLock(str(out)) as lock:
        assert lock.previous


def test_heads_that_do_not_divide_the_width_name_the_keys_of_both_config_systems():
    with pytest.raises(ValueError, match=r"MODEL.REVVIT.EMBED_DIM = 100 is not divisible by "):
        check_yacs_config(yacs_cfg(DEMO_YAML, "MODEL.REVVIT.EMBED_DIM", 100))
    lazy = lazy_cfg(DEMO_LAZY, "model.backbone.net.embed_dim=100")
    with pytest.raises(ValueError, match=r"model.backbone.net.embed_dim = 100 is not divisible"):
        check_lazy_config(lazy)


def test_min_size_train_zero_warns_that_resizing_is_off(caplog):
    with caplog.at_level(logging.WARNING):
        check_yacs_config(yacs_cfg(DEMO_YAML, "INPUT.MIN_SIZE_TRAIN", (0,)))
    assert "INPUT.MIN_SIZE_TRAIN = (0,): a size of 0 turns resizing off" in caplog.text


def test_resnet_caffe_input_with_a_vit_trunk_warns_naming_the_imagenet_settings(caplog):
    stock = ("INPUT.FORMAT", "BGR", "MODEL.PIXEL_MEAN", [103.53, 116.28, 123.675])
    stock += ("MODEL.PIXEL_STD", [1.0, 1.0, 1.0])
    with caplog.at_level(logging.WARNING):
        check_yacs_config(yacs_cfg(DEMO_YAML, *stock))
    assert "Detectron2's ResNet (Caffe) input, but RevViT weights" in caplog.text
    assert "MODEL.PIXEL_STD [58.395, 57.12, 57.375]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_yacs_config(yacs_cfg(DEMO_YAML))
    assert "Caffe" not in caplog.text
