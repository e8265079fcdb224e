"""The optimizer step inside backward (SOLVER.STEP_IN_BACKWARD, train.step_in_backward): the same
parameters as stepping after backward, in every backprop mode and under DDP; gradients freed in
backward; resume; and the combinations it refuses."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.solver import build_lr_scheduler
from detectron2.utils.events import EventStorage
from helpers import fake_batch, make_stack, rel_err, tiny_cfg
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rev_det.modeling import set_backprop
from rev_det.solver import build_optimizer
from rev_det.step_in_backward import attach_ddp, step_in_backward
from rev_det.utils.memory import MemoryTracker

OPTS = (
    "SOLVER.OPTIMIZER", "ADAMW", "SOLVER.BASE_LR", 1e-3, "SOLVER.WEIGHT_DECAY", 0.1,
    "SOLVER.LR_DECAY_RATE", 0.7, "SOLVER.WARMUP_ITERS", 3, "SOLVER.MAX_ITER", 5,
)  # fmt: skip


def train_detector(mode, in_backward, iterations=5, *opts):
    """A tiny RevViT Mask R-CNN after ``iterations`` AdamW steps (lr decay, weight decay groups,
    warm-up per iteration), stepping after or inside backward."""
    cfg = tiny_cfg(*OPTS, "SOLVER.STEP_IN_BACKWARD", in_backward, *opts)
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    model = set_backprop(build_model(cfg), mode)
    model.initial_qkv = model.backbone.net.blocks[0].attn.qkv.weight.detach().clone()
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for i in range(iterations):
        torch.manual_seed(10 + i)  # the same drop-path masks and ROI samples in both runs
        with EventStorage(i):
            losses = sum(model(fake_batch(((128, 160), (120, 150)))).values())
        optimizer.zero_grad()
        losses.backward()
        if in_backward:
            # Every gradient was used and freed inside backward.
            assert all(p.grad is None for p in model.parameters()), mode
        optimizer.step()
        scheduler.step()
    return model


@pytest.mark.parametrize("mode", ["autograd", "checkpoint", "reversible"])
def test_five_steps_inside_backward_give_the_parameters_of_five_ordinary_steps(mode):
    model = train_detector(mode, False)
    after = dict(model.named_parameters())
    inside = dict(train_detector(mode, True).named_parameters())
    assert after.keys() == inside.keys()
    for name, p in after.items():
        assert rel_err(inside[name], p) < 1e-6, name
    # The run did train: the weights moved from their initialisation.
    assert not torch.equal(after["backbone.net.blocks.0.attn.qkv.weight"], model.initial_qkv)


def linear_stack(width=256, depth=6):
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


def step_peak(model, optimizer):
    """Tracked peak of a step after the optimizer's state exists (its second step)."""
    x = torch.randn(4, 256)
    for _ in range(2):
        with MemoryTracker() as mem:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    return mem.peak


def test_gradients_are_freed_as_they_come_so_the_step_never_holds_them_all():
    params = sum(p.numel() * p.element_size() for p in linear_stack().parameters())
    plain = linear_stack()
    peak = step_peak(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3))
    inside = linear_stack()
    optimizer = step_in_backward(torch.optim.AdamW(inside.parameters(), lr=1e-3), inside)
    peak_inside = step_peak(inside, optimizer)
    # Ordinarily the step holds every gradient at once; inside backward, one layer's at most.
    assert peak - peak_inside > 0.75 * params
    for a, b in zip(plain.parameters(), inside.parameters()):
        assert torch.equal(a, b)


def test_sgd_with_momentum_and_per_parameter_clipping_steps_the_same_inside_backward():
    clip = ("SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 0.01)
    sgd = ("SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", 0.9, *clip)
    after = dict(train_detector("reversible", False, 3, *sgd).named_parameters())
    inside = dict(train_detector("reversible", True, 3, *sgd).named_parameters())
    for name, p in after.items():
        assert rel_err(inside[name], p) < 1e-6, name


def test_resumed_optimizer_state_and_lr_schedule_continue_exactly(tmp_path):
    """4 steps, save, load into a fresh model and optimizer (whose param groups load_state_dict
    replaces), 2 more: bit for bit the 6 uninterrupted steps."""

    def run(model, optimizer, scheduler, iterations, start=0):
        for i in range(start, start + iterations):
            torch.manual_seed(i)
            optimizer.zero_grad()
            model(torch.randn(4, 256)).square().mean().backward()
            optimizer.step()
            scheduler.step()

    def fresh():
        model = linear_stack()
        groups = [
            {"params": model[:3].parameters(), "lr": 1e-2},
            {"params": model[3:].parameters()},
        ]
        optimizer = step_in_backward(torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1), model)
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)

    straight = fresh()
    run(*straight, 6)
    first = fresh()
    run(*first, 4)
    path = tmp_path / "checkpoint.pth"
    torch.save({k: x.state_dict() for k, x in zip(("model", "opt", "sched"), first)}, path)
    resumed = fresh()
    state = torch.load(path)
    for key, x in zip(("model", "opt", "sched"), resumed):
        x.load_state_dict(state[key])
    run(*resumed, 2, start=4)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)


def test_a_second_gradient_before_step_is_refused_naming_the_parameter():
    model = linear_stack(depth=2)
    optimizer = step_in_backward(torch.optim.AdamW(model.parameters()), model)
    x = torch.randn(2, 256)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match=r"1.bias received a second gradient.*accumulation"):
        model(x).sum().backward()  # gradient accumulation: two backward passes per step
    optimizer.step()
    model(x).sum().backward()  # a new step: fine


@pytest.mark.parametrize(
    "opts, match",
    [
        (
            ("SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "float16"),
            r"SOLVER.STEP_IN_BACKWARD cannot combine with float16 AMP.*bfloat16",
        ),
    ],
)
def test_conflicts_are_refused_at_start_up_naming_the_key(opts, match):
    from detectron2.modeling import build_model

    cfg = tiny_cfg(*OPTS, "SOLVER.STEP_IN_BACKWARD", True, *opts)
    with pytest.raises(ValueError, match=match):
        build_optimizer(cfg, build_model(cfg))


def test_an_optimizer_other_than_adamw_or_sgd_is_refused():
    model = linear_stack(depth=1)
    with pytest.raises(ValueError, match=r"AdamW or SGD\); Adagrad is not one"):
        step_in_backward(torch.optim.Adagrad(model.parameters()), model)


def test_bfloat16_amp_steps_inside_backward_through_the_trainer():
    from detectron2.modeling import build_model

    from rev_det.training import RevAMPTrainer

    cfg = tiny_cfg(
        *OPTS, "SOLVER.STEP_IN_BACKWARD", True, "SOLVER.AMP.ENABLED", True,
        "SOLVER.AMP.PRECISION", "bfloat16",
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = RevAMPTrainer(cfg, model, iter([fake_batch()]), build_optimizer(cfg, model))
    with EventStorage(0):
        trainer.iter = 0
        trainer.run_step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "backbone.net.blocks.0.attn.qkv.weight" in moved
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------------------ DDP

WORLD = 2


def stack_loss(model, x):
    y1, y2 = model(x, x)
    return (y1 * y2).mean()


def stack_and_optimizer(in_backward):
    stack = make_stack(4, dtype=torch.float64, dropout=0.0, drop_path=0.0).train()
    optimizer = torch.optim.AdamW(stack.parameters(), lr=1e-2, weight_decay=0.1)
    return stack, (step_in_backward(optimizer, stack) if in_backward else optimizer)


def ddp_run(rank, x, in_backward, fp16_compression):
    """3 DDP steps of the stack; small buckets, so that there are several."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    stack, optimizer = stack_and_optimizer(in_backward)
    model = DistributedDataParallel(stack, find_unused_parameters=False, bucket_cap_mb=0.001)
    if in_backward:
        attach_ddp(optimizer, model, fp16_compression)
    elif fp16_compression:
        model.register_comm_hook(None, fp16_compress_hook)  # as Detectron2's create_ddp_model
    half = x.shape[1] // WORLD
    for step in range(3):
        optimizer.zero_grad()
        before = [p.detach().clone() for p in stack.parameters()]
        stack_loss(model, x[step, rank * half : (rank + 1) * half]).backward()
        # Stepped inside backward, after the all-reduce: every parameter moved already.
        moved = [not torch.equal(p, b) for p, b in zip(stack.parameters(), before)]
        assert all(moved) if in_backward else not any(moved)
        optimizer.step()
    return {n: p.detach() for n, p in stack.named_parameters()}


def ddp_worker(rank, init_file, x, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {
        "inside": ddp_run(rank, x, True, False),
        "inside, fp16": ddp_run(rank, x, True, True),
        "after, fp16": ddp_run(rank, x, False, True),
    }
    if rank == 0:
        torch.save(results, result_file)
    dist.destroy_process_group()


def test_ddp_steps_after_each_buckets_all_reduce_as_one_process_on_the_combined_batch(tmp_path):
    """2 gloo processes stepping inside backward (after each bucket's all-reduce) == one process
    stepping after backward on both halves; with float16 compression of the all-reduce, the
    same as DDP stepping after backward with that compression."""
    x = torch.randn(3, 4, 12, 16, dtype=torch.float64)
    single, optimizer = stack_and_optimizer(False)
    for step in range(3):
        optimizer.zero_grad()
        stack_loss(single, x[step]).backward()
        optimizer.step()
    result = str(tmp_path / "params.pt")
    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), x, result), nprocs=WORLD)
    ddp = torch.load(result)
    for name, p in single.named_parameters():
        # float64: AdamW's first steps are about lr * sign(gradient), so float32 rounding of the
        # smallest gradient entries could flip them.
        assert rel_err(ddp["inside"][name], p) < 1e-9, name
        assert torch.equal(ddp["inside, fp16"][name], ddp["after, fp16"][name]), name


@pytest.mark.parametrize("size, gb", [("l", 8), ("h", 12)])
def test_low_memory_recipes_step_inside_backward_and_recompute_the_heads(size, gb):
    from detectron2.config import LazyConfig
    from helpers import ROOT, yacs_cfg

    from rev_det.modeling import build_detector

    coco = os.path.join(ROOT, "configs", "COCO")
    cfg = yacs_cfg(
        os.path.join(coco, f"mask_rcnn_rev_vit_{size}_{gb}gb.yaml"), "MODEL.DEVICE", "meta"
    )
    assert cfg.SOLVER.AMP.PRECISION == "bfloat16"
    model = build_detector(cfg)
    assert type(model.roi_heads.box_head).__name__ == "RecomputedFastRCNNConvFCHead"
    assert build_optimizer(cfg, model).step_in_backward is not None
    lazy = LazyConfig.load(os.path.join(coco, f"mask_rcnn_rev_vit_{size}_100ep_{gb}gb.py"))
    assert lazy.train.step_in_backward and lazy.train.recompute_heads
    assert lazy.train.amp.precision == "bfloat16"
    assert lazy.model.backbone.net.embed_dim == {"l": 1024, "h": 1280}[size]
