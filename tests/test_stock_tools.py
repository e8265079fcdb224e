"""rev_det from Detectron2's own tools: the installed Detectron2's stock DefaultTrainer (every
version) and, on Detectron2 main, its unmodified tools/lazyconfig_train_net.py training ViTDet's
own config with rev_det's backbone."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import detectron2
import pytest
import torch
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model
from detectron2.solver.build import maybe_add_gradient_clipping
from helpers import ROOT, tiny_cfg
from torch.optim import AdamW

from rev_det.data import ensure_shapes_dataset
from rev_det.demo import shapes
from rev_det.solver import build_optimizer, expect_optimizer


def stock_cfg(output_dir, *opts):
    """The tiny demo config on the shapes dataset, as a project's train_net.py would load it."""
    return tiny_cfg(
        "DATASETS.TRAIN", ("revdet_shapes_train",), "DATASETS.TEST", (),
        "INPUT.MIN_SIZE_TRAIN", (128,), "INPUT.MAX_SIZE_TRAIN", 192,
        "SOLVER.IMS_PER_BATCH", 1, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", (),
        "SOLVER.WARMUP_ITERS", 1, "DATALOADER.NUM_WORKERS", 0, "OUTPUT_DIR", output_dir,
        *opts,
    )  # fmt: skip


@pytest.fixture
def tiny_shapes(shapes_registered, monkeypatch):
    """The shapes datasets registered in a temporary root, generated small on first use."""
    monkeypatch.setattr(shapes, "DEFAULT_SIZES", {"train": 2, "val": 1})
    return shapes_registered


class RevDetTrainer(DefaultTrainer):
    """What the "Detectron2 versions" section of docs/projects.md adds to a project's train_net.py."""

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def test_stock_default_trainer_cannot_silently_train_an_adamw_config_with_sgd(
    tiny_shapes, tmp_path
):
    cfg = stock_cfg(str(tmp_path))
    assert cfg.SOLVER.OPTIMIZER == "ADAMW"
    trainer = DefaultTrainer(cfg)
    assert type(trainer.optimizer) is torch.optim.SGD  # what the stock trainer builds
    with pytest.raises(RuntimeError, match="SOLVER.OPTIMIZER is 'ADAMW'.*trained by SGD") as error:
        trainer.train()
    assert "rev_det.solver.build_optimizer(cfg, model)" in str(error.value)
    assert trainer.iter == 0  # stopped at its first step


@pytest.mark.parametrize("optimizer", ["ADAMW", "SGD"])
def test_default_trainer_trains_with_the_configured_optimizer(optimizer, tiny_shapes, tmp_path):
    cfg = stock_cfg(str(tmp_path), "SOLVER.OPTIMIZER", optimizer)
    # rev_det's builder honours SOLVER.OPTIMIZER; the stock one is right when it says SGD.
    trainer = (RevDetTrainer if optimizer == "ADAMW" else DefaultTrainer)(cfg)
    before = [p.detach().clone() for p in trainer.model.backbone.parameters()]
    trainer.train()
    expected = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}[optimizer]
    assert isinstance(trainer.optimizer, expected)
    assert trainer.iter == 2 and os.path.isfile(tmp_path / "model_final.pth")
    after = list(trainer.model.backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_expect_optimizer_checks_each_optimizer_of_the_module_at_its_first_step():
    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    assert expect_optimizer(model, "adamw") is model

    def step(optimizer, module):
        module(torch.ones(1, 3)).sum().backward()
        optimizer.step()

    clipped = maybe_add_gradient_clipping(tiny_cfg("SOLVER.CLIP_GRADIENTS.ENABLED", True), AdamW)
    step(clipped(model.parameters()), model)  # a subclass of AdamW is AdamW
    step(torch.optim.SGD(other.parameters(), lr=0.1), other)  # not the module's parameters
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="SOLVER.OPTIMIZER is 'ADAMW'.*trained by SGD"):
        step(sgd, model)
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER = 'LAMB' is not valid.*'ADAMW'"):
        expect_optimizer(other, "LAMB")
    expect_optimizer(other, "SGD")  # Detectron2's default: nothing to check
    step(torch.optim.Adam(other.parameters()), other)


# ---------------------------------------------------------------- Detectron2 main only

# Detectron2 main has its own ViTDet (detectron2.modeling.backbone.vit); an editable source
# install keeps the tree that holds its tools/ and projects/ beside the package.
D2_TREE = os.path.dirname(os.path.dirname(os.path.abspath(detectron2.__file__)))
LAZY_TRAIN_NET = os.path.join(D2_TREE, "tools", "lazyconfig_train_net.py")
VITDET_OVERRIDE = os.path.join(ROOT, "tests", "configs", "vitdet_b_rev_vit_shapes.py")
has_vitdet_tree = pytest.mark.skipif(
    importlib.util.find_spec("detectron2.modeling.backbone.vit") is None
    or not os.path.isfile(LAZY_TRAIN_NET),
    reason="needs Detectron2 main with ViTDet installed editable from its source tree "
    "(docs/detectron2_versions.md)",
)


@pytest.mark.slow
@has_vitdet_tree
def test_d2main_lazyconfig_train_net_trains_vitdet_config_with_rev_det_backbone(tmp_path):
    datasets_root = str(tmp_path / "datasets")
    ensure_shapes_dataset(datasets_root, num_train=8, num_val=4)
    out = str(tmp_path / "out")
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            LAZY_TRAIN_NET,
            "--config-file",
            VITDET_OVERRIDE,
            f"train.output_dir={out}",
        ],
        cwd=D2_TREE,  # main's own tool, run from its tree as its docs do
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "ReversibleFeaturePyramid(" in log and "RevViT(" in log  # the model it trained
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)  # iterations 1 and 3
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    for task in ("bbox", "segm"):  # COCO evaluation of the validation split
        assert f"copypaste: Task: {task}" in log, log[-3000:]


def test_optimizer_guard_accepts_wrappers_that_hold_adamw_and_has_an_opt_out(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from rev_det import optimizer_guard

    model = torch.nn.Linear(3, 2)
    expect_optimizer(model, "ADAMW")

    def step(optimizer):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()

    class Lookahead(torch.optim.Optimizer):
        """A wrapper in the usual style: an Optimizer holding the one that updates."""

        def __init__(self, optimizer):
            super().__init__([p for g in optimizer.param_groups for p in g["params"]], {})
            self.optimizer = optimizer

        def step(self, closure=None):
            return self.optimizer.step(closure)

    step(Lookahead(AdamW(model.parameters())))
    with pytest.raises(RuntimeError, match="trained by Lookahead.*SOLVER.CHECK_OPTIMIZER False"):
        step(Lookahead(torch.optim.SGD(model.parameters(), lr=0.1)))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        step(ZeroRedundancyOptimizer(model.parameters(), optimizer_class=AdamW))
        with pytest.raises(RuntimeError, match="trained by ZeroRedundancyOptimizer"):
            zero = ZeroRedundancyOptimizer(
                model.parameters(), optimizer_class=torch.optim.SGD, lr=0.1
            )
            step(zero)
    finally:
        dist.destroy_process_group()
    # The guard imports nothing of rev_det's models.
    assert "rev_det" not in " ".join(
        line for line in open(optimizer_guard.__file__) if line.startswith(("import", "from"))
    )


def test_check_optimizer_false_builds_the_backbone_without_the_guard():
    from rev_det import optimizer_guard

    cfg = tiny_cfg("SOLVER.OPTIMIZER", "ADAMW", "SOLVER.CHECK_OPTIMIZER", False)
    model = build_model(cfg)
    assert model.backbone not in optimizer_guard._EXPECTED
    cfg = tiny_cfg("SOLVER.OPTIMIZER", "ADAMW")
    assert build_model(cfg).backbone in optimizer_guard._EXPECTED
