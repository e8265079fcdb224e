"""rev_det.checkpoint: atomic saves, the load report, STRICT_LOAD and the per-iteration seeds."""

import logging
import os
import random
import types

import numpy as np
import pytest
import torch
from torch import nn

from rev_det.checkpoint import AtomicCheckpointer, IterationSeeder, atomic_open


class Detector(nn.Module):
    """Named like a GeneralizedRCNN: a ``backbone`` and heads."""

    def __init__(self, width=4, head_width=3, extra=False):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width))
        self.roi_heads = nn.Linear(width, head_width)
        if extra:
            self.extra = nn.Linear(2, 2)


def saved_files(directory):
    return sorted(os.listdir(directory))


def test_a_crash_while_saving_leaves_the_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model = Detector()
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009")
    checkpointer.save("model_final")
    before = {n: (tmp_path / n).read_bytes() for n in saved_files(tmp_path)}
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    real_save = torch.save

    def crash_half_way(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)  # part of the file is on disk ...
        raise OSError("No space left on device")  # ... when the writer dies

    monkeypatch.setattr(torch, "save", crash_half_way)
    with torch.no_grad():
        model.backbone[0].weight.add_(1.0)
    for name in ("model_0000019", "model_final"):  # a new name, and one that exists
        with pytest.raises(OSError, match="No space left"):
            checkpointer.save(name)
    # Nothing at a final name is partial, the tag still names a complete checkpoint, and no
    # temporary file is left behind.
    assert {n: (tmp_path / n).read_bytes() for n in saved_files(tmp_path)} == before
    monkeypatch.undo()
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_final.pth")
    Detector().load_state_dict(torch.load(tmp_path / "model_final.pth")["model"])


def test_a_crash_while_tagging_leaves_the_previous_tag(tmp_path, monkeypatch):
    checkpointer = AtomicCheckpointer(Detector(), str(tmp_path))
    checkpointer.save("model_0000009")

    def fail_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="I/O error"):
        checkpointer.tag_last_checkpoint("model_0000019.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert saved_files(tmp_path) == ["last_checkpoint", "model_0000009.pth"]


def test_atomic_open_replaces_whole_files_with_the_umask_permissions(tmp_path):
    path = tmp_path / "tag"
    with atomic_open(str(path), "w") as f:
        f.write("first")
        assert not path.exists()  # written next to it until complete
    with atomic_open(str(path), "w") as f:
        f.write("second")
    assert path.read_text() == "second"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert saved_files(tmp_path) == ["tag"]


def test_save_keeps_detectron2s_format(tmp_path):
    model = Detector()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    AtomicCheckpointer(model, str(tmp_path), optimizer=optimizer).save("model_0000004", iteration=4)
    data = torch.load(tmp_path / "model_0000004.pth")
    assert data.keys() == {"model", "optimizer", "iteration"}
    assert data["iteration"] == 4
    assert all(torch.equal(data["model"][k], v) for k, v in model.state_dict().items())


def write_checkpoint(path, model):
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def test_load_reports_loaded_missing_reshaped_and_unused_counts(tmp_path, caplog):
    # The checkpoint: no backbone.1.bias, roi_heads of another shape (5 outputs, not 3), and an
    # extra module the model does not have.
    path = write_checkpoint(tmp_path / "w.pth", Detector(head_width=5, extra=True))
    data = torch.load(path)
    del data["model"]["backbone.1.bias"]
    torch.save(data, path)
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        AtomicCheckpointer(Detector()).load(path)
    summary = [r for r in caplog.records if "of the model's" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.WARNING
    assert summary[0].getMessage() == (
        "Loaded 3 of the model's 6 weights from the checkpoint: 1 missing, 2 of another shape, "
        "2 in the checkpoint unused."
    )

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fvcore.common.checkpoint"):
        AtomicCheckpointer(Detector()).load(write_checkpoint(tmp_path / "same.pth", Detector()))
    assert "Loaded 6 of the model's 6 weights from the checkpoint: 0 missing" in caplog.text


def test_strict_load_requires_every_backbone_weight(tmp_path):
    full = write_checkpoint(tmp_path / "full.pth", Detector())
    other_heads = write_checkpoint(tmp_path / "heads.pth", Detector(head_width=5))
    other_backbone = write_checkpoint(tmp_path / "backbone.pth", Detector(width=6))
    trunk_only = torch.load(full)
    del trunk_only["model"]["backbone.1.weight"]
    torch.save(trunk_only, tmp_path / "partial.pth")

    strict = AtomicCheckpointer(Detector(), strict_load=True)
    strict.load(full)
    strict.load(other_heads)  # missing or reshaped head weights are the usual fine-tuning case
    with pytest.raises(RuntimeError, match="lacks 1 backbone weights") as missing:
        strict.load(str(tmp_path / "partial.pth"))
    with pytest.raises(RuntimeError, match="lacks 4 backbone weights") as reshaped:
        strict.load(other_backbone)
    for error in (missing, reshaped):
        message = str(error.value)
        assert "backbone.1.weight" in message
        assert "tools/convert_pretrained.py" in message and "STRICT_LOAD False" in message
    # A rejected load leaves the checkpointer usable (Detectron2 main's kept per-load state).
    with torch.no_grad():
        for p in strict.model.parameters():
            p.zero_()
    strict.load(full)
    expected = torch.load(full)["model"]
    assert all(torch.equal(v, expected[k]) for k, v in strict.model.state_dict().items())
    AtomicCheckpointer(Detector()).load(other_backbone)  # not strict: loads what it can


def test_strict_load_config_key_defaults_to_off():
    from detectron2.config import get_cfg

    from rev_det import add_revdet_config

    assert add_revdet_config(get_cfg()).MODEL.REV.STRICT_LOAD is False


def test_iteration_seeder_makes_each_iterations_draws_depend_on_seed_rank_and_iteration(
    monkeypatch,
):
    trainer = types.SimpleNamespace(iter=7)

    def draws_at(iteration, seed=42):
        hook = IterationSeeder(seed)
        hook.trainer = trainer
        trainer.iter = iteration
        hook.before_step()
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()

    at_7 = draws_at(7)
    torch.rand(5), np.random.rand(5), random.random()  # whatever else the run draws ...
    assert draws_at(7) == at_7  # ... iteration 7 draws the same again
    assert draws_at(8) != at_7
    assert draws_at(7, seed=43) != at_7
    monkeypatch.setattr("detectron2.utils.comm.get_rank", lambda: 1)
    assert draws_at(7) != at_7  # each rank draws its own numbers
    with pytest.raises(ValueError, match="non-negative seed"):
        IterationSeeder(-1)


def test_strict_load_requires_the_trunk_not_the_pyramid(tmp_path):
    # A converted pretrained checkpoint holds the trunk (backbone.net) only: the pyramid and the
    # heads are new in a detector and must not make a strict load fail.
    def detector():
        model = nn.Module()
        model.backbone = nn.Module()
        model.backbone.net = nn.Linear(3, 4)
        model.backbone.pyramid = nn.Linear(4, 4)
        model.head = nn.Linear(4, 2)
        return model

    trunk = {k: v for k, v in detector().state_dict().items() if k.startswith("backbone.net.")}
    torch.save({"model": trunk}, tmp_path / "trunk.pth")
    no_trunk = {k: v for k, v in detector().state_dict().items() if k != "backbone.net.bias"}
    torch.save({"model": no_trunk}, tmp_path / "no_trunk.pth")
    strict = AtomicCheckpointer(detector(), strict_load=True)
    strict.load(str(tmp_path / "trunk.pth"))
    with pytest.raises(RuntimeError, match="lacks 1 backbone weights.*: backbone.net.bias\\."):
        strict.load(str(tmp_path / "no_trunk.pth"))
