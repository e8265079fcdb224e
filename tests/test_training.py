"""Mixed precision training on CPU (RevAMPTrainer) and the reconstruction check hook."""

import itertools
import math

import pytest
import torch
from detectron2.engine import HookBase, SimpleTrainer
from detectron2.modeling import build_model
from helpers import DEMO_MVIT, Block, fake_batch, make_stack, tiny_cfg, yacs_cfg
from torch import nn

from rev_det.modeling.rev_mvit import RevMViTBlock
from rev_det.modeling.rev_vit import RevViTBlock
from rev_det.reversible import ReconstructionError, ReversibleBlock, ReversibleSequence
from rev_det.solver import build_optimizer
from rev_det.training import ReconstructionCheck, RevAMPTrainer, parse_precision


def tiny_mvit_cfg(*opts):
    return yacs_cfg(
        DEMO_MVIT,
        "MODEL.REVMVIT.EMBED_DIM", 16,
        "MODEL.REVMVIT.DROP_PATH_RATE", 0.1,
        "MODEL.FPN.OUT_CHANNELS", 32,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
        *opts,
    )  # fmt: skip


MODELS = {"rev_vit": (tiny_cfg, RevViTBlock), "rev_mvit": (tiny_mvit_cfg, RevMViTBlock)}


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_amp_training_steps_on_cpu(arch, precision, monkeypatch):
    make_cfg, block_class = MODELS[arch]
    cfg = make_cfg("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", precision)
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = []
    original = block_class.G

    def spy(self, x):
        out = original(self, x)
        seen.append((torch.is_grad_enabled(), out.dtype))  # grad is on only in the re-runs
        return out

    monkeypatch.setattr(block_class, "G", spy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = itertools.repeat(fake_batch(((128, 160), (144, 128))))
    trainer = RevAMPTrainer(cfg, model, data, build_optimizer(cfg, model))
    trainer.train(0, 2)

    dtype = getattr(torch, precision)
    assert {s for s in seen if s[0]} == {(True, dtype)}  # recomputed in the forward's dtype
    assert {s for s in seen if not s[0]} == {(False, dtype)}
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    blocks = [m for m in model.modules() if isinstance(m, ReversibleBlock)]
    for block in blocks:
        name = next(n for n, m in model.named_modules() if m is block)
        assert any(
            not torch.equal(p, before[f"{name}.{n}"]) for n, p in block.named_parameters()
        ), name


def test_precision_and_loss_scaling_from_config():
    model = nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = tiny_cfg("SOLVER.AMP.ENABLED", True)
    assert cfg.SOLVER.AMP.PRECISION == "float16"  # added by add_revdet_config
    trainer = RevAMPTrainer(cfg, model, [], optimizer)
    assert trainer.precision == torch.float16 and trainer.device_type == "cpu"
    assert trainer.grad_scaler.is_enabled()
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    trainer = RevAMPTrainer(cfg, model, [], optimizer)
    assert trainer.precision == torch.bfloat16 and not trainer.grad_scaler.is_enabled()
    assert "grad_scaler" in trainer.state_dict()  # AMPTrainer's checkpoint format
    with pytest.raises(ValueError, match="'float16' .* or 'bfloat16'"):
        parse_precision("fp8")


class NanLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, data):
        return {"loss": self.w * float("nan")}


def test_non_finite_loss_takes_detectron2s_floating_point_error_path():
    model = NanLoss()
    trainer = RevAMPTrainer(
        model, itertools.repeat(None), torch.optim.SGD(model.parameters(), lr=0.1),
        precision="bfloat16",
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="Loss became infinite or NaN"):
        trainer.train(0, 1)


class StackModel(nn.Module):
    """A reversible stack as a "detector": data in, a dict of losses out."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        y1, y2 = self.stack(x, x)
        return {"loss": (y1 * y2).mean()}


def train_stack(stack, hooks, iters=4, trainer_class=SimpleTrainer, **kw):
    model = StackModel(stack).train()
    x = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(0))
    x = x.to(next(stack.parameters()).dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = trainer_class(model, itertools.repeat(x), optimizer, **kw)
    trainer.register_hooks(hooks)
    trainer.train(0, iters)
    return trainer


def logged(trainer, name):
    return [(it, v) for v, it in trainer.storage.history(name).values()]


def test_check_logs_drift_every_period():
    trainer = train_stack(make_stack(4, torch.float32), [ReconstructionCheck(period=2)], iters=5)
    max_errors = logged(trainer, "reversible/max_rel_error")
    mean_errors = logged(trainer, "reversible/mean_rel_error")
    assert [it for it, _ in max_errors] == [it for it, _ in mean_errors] == [1, 3]
    assert all(0 < v < 1e-5 for _, v in max_errors + mean_errors)  # fp32: rounding only


def test_check_measures_in_the_training_precision(monkeypatch):
    dtypes = []
    original = Block.G

    def spy(self, x):
        out = original(self, x)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(Block, "G", spy)
    train_stack(
        make_stack(4, torch.float32), [ReconstructionCheck(period=1)], iters=1,
        trainer_class=RevAMPTrainer, precision="bfloat16",
    )  # fmt: skip
    # forward, re-run in backward, and the check's forward and rebuild: 4 blocks each
    assert dtypes == [torch.bfloat16] * 16


def test_check_does_not_change_training():
    params = []
    for hooks in ([], [ReconstructionCheck(period=1)]):
        stack = make_stack(4)  # float64, dropout and drop path active
        train_stack(stack, hooks, iters=3)
        params.append([p.detach().clone() for p in stack.parameters()])
    for a, b in zip(*params):
        assert torch.equal(a, b)


class Drifting(Block):
    """G adds how often it was called: the re-runs do not undo the forward."""

    calls = 0

    def G(self, x):
        self.calls += 1
        return super().G(x) + self.calls


def test_check_raises_on_large_drift_naming_the_block():
    torch.manual_seed(0)
    stack = ReversibleSequence([Block(), Drifting(), Block()])
    message = (
        r"off by up to .* above the threshold 0.1 .* It starts at block 1 of a 3-block sequence "
        r"\('stack.1', Drifting\)"
    )
    with pytest.raises(ReconstructionError, match=message):
        train_stack(stack, [ReconstructionCheck(period=2, threshold=0.1)])


class Poison(HookBase):
    """After the step, makes a block return nan: the check, which runs next, must see it."""

    def __init__(self, block):
        self.block = block

    def after_step(self):
        self.block.G = lambda x: torch.full_like(x, float("nan"))


def test_check_raises_on_non_finite_reconstruction():
    stack = make_stack(3)
    with pytest.raises(
        ReconstructionError, match=r"are not finite .* It starts at block 2 .*'stack.2'"
    ):
        train_stack(stack, [Poison(stack[2]), ReconstructionCheck(period=1)])


def test_check_from_config_is_off_by_default():
    check = ReconstructionCheck(tiny_cfg())
    assert check.period == 0 and check.threshold == 0.1
    trainer = train_stack(make_stack(2, torch.float32), [check], iters=2)
    assert "reversible/max_rel_error" not in trainer.storage.histories()
    check = ReconstructionCheck(tiny_cfg("MODEL.REV.CHECK_RECONSTRUCTION.PERIOD", 3))
    assert check.period == 3
    with pytest.raises(ValueError, match="threshold must be positive"):
        ReconstructionCheck(period=1, threshold=0)


def test_parallel_backward_reaches_every_trunk_from_config():
    for make_cfg in (tiny_cfg, tiny_mvit_cfg):
        for value in (False, True):
            model = build_model(make_cfg("MODEL.REV.PARALLEL_BACKWARD", value))
            flags = [
                m.parallel_backward for m in model.modules() if hasattr(m, "parallel_backward")
            ]
            assert flags == [value], make_cfg.__name__


def test_check_has_nothing_to_measure_without_reversible_backprop():
    stack = make_stack(2, torch.float32)
    stack.backprop = "checkpoint"  # nothing is rebuilt
    trainer = train_stack(stack, [ReconstructionCheck(period=1)], iters=2)
    assert "reversible/max_rel_error" not in trainer.storage.histories()
