"""Resuming equals not stopping: the resumable loader, and real kills through both entry points."""

import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import (
    DEMO_LAZY,
    DEMO_YAML,
    ROOT,
    TINY_LAZY,
    TINY_YACS,
    load_entry_point,
    run,
    yacs_cfg,
)

from rev_det.data import ResumableBatchSampler, build_resumable_train_loader

# Landscape and portrait images, so that aspect-ratio grouping holds images back.
DICTS = [{"id": i, "width": 300 if i % 3 else 200, "height": 250} for i in range(10)]


def take(iterable, n):
    return list(itertools.islice(iterable, n))


def test_batch_sampler_resumes_at_any_iteration():
    group_ids = [0 if d["width"] > d["height"] else 1 for d in DICTS]
    batches = take(ResumableBatchSampler(len(DICTS), 3, group_ids=group_ids, seed=5), 40)
    for start in (1, 7, 13):
        resumed = ResumableBatchSampler(
            len(DICTS), 3, group_ids=group_ids, seed=5, start_iter=start
        )
        assert take(resumed, 20) == batches[start : start + 20]
    for batch in batches:
        assert len({group_ids[index] for _, index in batch}) == 1  # one orientation per batch
    positions = sorted(p for batch in batches for p, _ in batch)
    assert len(set(positions)) == len(positions)  # each draw of the stream used once
    # Grouping holds portrait images back, so batches do not simply follow the stream.
    assert [p for batch in batches for p, _ in batch] != positions


def test_batch_sampler_ranks_share_one_stream(monkeypatch):
    def sampler(rank, world_size):
        monkeypatch.setattr("detectron2.utils.comm.get_rank", lambda: rank)
        monkeypatch.setattr("detectron2.utils.comm.get_world_size", lambda: world_size)
        return ResumableBatchSampler(len(DICTS), 2, seed=5)

    stream = dict(p for batch in take(sampler(0, 1), 30) for p in batch)  # position -> index
    for rank in (0, 1):
        for batch in take(sampler(rank, 2), 15):
            for position, index in batch:
                assert position % 2 == rank and stream[position] == index


def noisy_mapper(d):
    """An 'augmentation' drawing from all three global generators; None drops image 4."""
    if d["id"] == 4:
        return None
    return (d["id"], torch.rand(1).item(), np.random.rand(), random.random())


def loader(num_workers=0, start_iter=0):
    return build_resumable_train_loader(
        DICTS,
        mapper=noisy_mapper,
        total_batch_size=2,
        num_workers=num_workers,
        seed=3,
        start_iter=start_iter,
    )


def test_loader_batches_do_not_depend_on_start_or_workers():
    batches = take(loader(), 12)
    assert take(loader(num_workers=2, start_iter=5), 7) == batches[5:12]
    samples = [s for batch in batches for s in batch]
    assert 4 not in {s[0] for s in samples} and min(len(b) for b in batches) == 1
    # The draws are random: per sample, and per pass over the same image.
    image_0 = [s for s in samples if s[0] == 0]
    assert len(image_0) >= 2 and len({s[1:] for s in image_0}) == len(image_0)


def test_start_iter_can_be_set_after_iter_and_global_generators_are_untouched():
    expected = take(loader(), 6)[4:]
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    resumable = loader()
    batches = iter(resumable)  # Detectron2 v0.6's SimpleTrainer does this before the resume
    resumable.start_iter = 4
    assert take(batches, 2) == expected
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]


def test_bad_loader_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        build_resumable_train_loader(DICTS, mapper=noisy_mapper, total_batch_size=0)
    with pytest.raises(ValueError, match="'width' and 'height'"):
        build_resumable_train_loader([{"id": 0}], mapper=noisy_mapper, total_batch_size=1)
    with pytest.raises(TypeError, match="list of dataset dicts"):
        build_resumable_train_loader(tuple(DICTS), mapper=noisy_mapper, total_batch_size=1)

    cfg = yacs_cfg(DEMO_YAML, "DATALOADER.SAMPLER_TRAIN", "RepeatFactorTrainingSampler")
    with pytest.raises(ValueError, match="'TrainingSampler' only"):
        build_resumable_train_loader(cfg)


# The tiny demo runs of test_train_net, with randomness in every part of a step: random resize
# and flip, drop path, and the ROI heads' sampling. The interrupted run maps its images in a
# worker process, the uninterrupted one in the main process.
ENTRY_POINTS = {
    "yacs": (
        "train_net.py",
        ["--config-file", DEMO_YAML],
        lambda out, workers: TINY_YACS + [
            "INPUT.MIN_SIZE_TRAIN", "(128,160)", "MODEL.REVVIT.DROP_PATH_RATE", "0.1",
            "SOLVER.MAX_ITER", "40", "DATALOADER.NUM_WORKERS", str(workers), "OUTPUT_DIR", out,
        ],
    ),
    "lazy": (
        "lazyconfig_train_net.py",
        ["--config-file", DEMO_LAZY],
        lambda out, workers: TINY_LAZY + [
            "dataloader.train.mapper.augmentations.0.short_edge_length=[128,160]",
            "model.backbone.net.drop_path_rate=0.1", "train.max_iter=40",
            f"dataloader.train.num_workers={workers}", f"train.output_dir={out}",
            # The demo's LazyConfig builds Detectron2's loader, whose data order restarts.
            "dataloader.train._target_=rev_det.data.build_resumable_train_loader",
        ],
    ),
}  # fmt: skip


def run_until_first_checkpoint_and_kill(script, args, datasets_root, output_dir):
    """Start a training run and SIGKILL it (and its data workers) once it has a checkpoint."""
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "projects", script), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 900
    try:
        while not os.path.exists(os.path.join(output_dir, "last_checkpoint")):
            assert (
                proc.poll() is None
            ), f"{script} exited with {proc.returncode} before a checkpoint"
            assert time.monotonic() < deadline, f"{script} wrote no checkpoint in 15 minutes"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def losses_and_lr(output_dir):
    """{iteration: {"total_loss": ..., "loss_cls": ..., ..., "lr": ...}} from metrics.json."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {
        r["iteration"]: {k: v for k, v in r.items() if "loss" in k or k == "lr"}
        for r in records
        if "total_loss" in r
    }


def weights(path):
    return torch.load(path, map_location="cpu")["model"]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_killed_and_resumed_run_equals_uninterrupted_run(entry, datasets_root, tmp_path):
    """40 iterations straight, against 40 iterations killed after the checkpoint at 20.

    metrics.json holds medians over Detectron2's 20-iteration window, written every 20
    iterations; resuming at 20 starts a new window, so the record of iteration 39 covers the
    same 20 iterations (20-39) in both runs and must be equal, loss by loss. The final weights,
    which depend on every step, must be equal bit for bit.
    """
    script, config, opts = ENTRY_POINTS[entry]
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    run(script, config + opts(straight, 0), datasets_root)

    run_until_first_checkpoint_and_kill(
        script, config + opts(interrupted, 1), datasets_root, interrupted
    )
    with open(os.path.join(interrupted, "last_checkpoint")) as f:
        assert f.read() == "model_0000019.pth"
    assert not os.path.exists(os.path.join(interrupted, "model_final.pth"))  # really cut short
    log = run(script, config + ["--resume"] + opts(interrupted, 1), datasets_root)
    assert "Starting training from iteration 20" in log

    expected = losses_and_lr(straight)
    assert sorted(expected) == [19, 39]
    assert losses_and_lr(interrupted)[39] == expected[39]
    for name in ("model_0000019.pth", "model_final.pth"):
        a, b = weights(os.path.join(straight, name)), weights(os.path.join(interrupted, name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_strict_load_names_missing_backbone_weights(entry, datasets_root, tmp_path):
    checkpoint = str(tmp_path / "heads_only.pth")
    torch.save({"model": {"roi_heads.box_predictor.cls_score.bias": torch.zeros(7)}}, checkpoint)
    script, config, opts = ENTRY_POINTS[entry]
    args = config + ["--eval-only"] + opts(str(tmp_path / "out"), 0)
    if entry == "yacs":
        args += ["MODEL.WEIGHTS", checkpoint, "MODEL.REV.STRICT_LOAD", "True"]
    else:
        args += [f"train.init_checkpoint={checkpoint}", "train.strict_load=True"]
    with pytest.raises(AssertionError) as failed:
        run(script, args, datasets_root)
    message = str(failed.value)
    assert re.search(
        r"Strict load: the checkpoint lacks \d+ backbone weights.*: backbone\.", message
    )
    assert "tools/convert_pretrained.py" in message


def test_yacs_trainer_saves_atomically_and_resumes_optimizer_and_data(tmp_path):
    from detectron2.engine import hooks
    from detectron2.utils.events import EventStorage

    from rev_det.checkpoint import AtomicCheckpointer, IterationSeeder
    from rev_det.data import ResumableTrainLoader, ensure_shapes_dataset

    ensure_shapes_dataset(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    Trainer = load_entry_point("train_net").Trainer
    cfg = yacs_cfg(
        DEMO_YAML, *TINY_YACS, "MODEL.REV.STRICT_LOAD", True, "OUTPUT_DIR", str(tmp_path)
    )
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, AtomicCheckpointer) and trainer.checkpointer.strict_load
    saving = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert [h.checkpointer for h in saving] == [trainer.checkpointer]
    assert isinstance(trainer._hooks[0], IterationSeeder)
    assert isinstance(trainer.data_loader, ResumableTrainLoader)

    with EventStorage(4):
        trainer.iter = 4
        trainer.run_step()  # AdamW now has moments
    trainer.checkpointer.save("model_0000004", iteration=4)
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == resumed.data_loader.start_iter == 5
    saved, loaded = trainer.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert saved["state"] and saved["state"].keys() == loaded["state"].keys()
    for key, state in saved["state"].items():
        assert all(torch.equal(v, loaded["state"][key][k]) for k, v in state.items())
