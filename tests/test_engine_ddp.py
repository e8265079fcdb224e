"""The reversible Function inside DistributedDataParallel (gloo on CPU): gradients equal to one
process on the combined batch, and the guard against find_unused_parameters=True."""

import os
import tempfile
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    DEMO_LAZY,
    DEMO_YAML,
    TINY_LAZY,
    TINY_YACS,
    load_entry_point,
    make_stack,
    yacs_cfg,
)
from torch.nn.parallel import DistributedDataParallel

from rev_det.modeling import set_backprop
from rev_det.reversible.ddp import check_ddp_model, reversible_owners

WORLD = 2


def loss_of(model, x):
    y1, y2 = model(x, x)
    return (y1 * y2).mean()


def worker(rank, init_file, x, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    stack = make_stack(6, dropout=0.0, drop_path=0.0).train()
    model = DistributedDataParallel(stack, find_unused_parameters=False)
    half = x.shape[0] // WORLD
    loss_of(model, x[rank * half : (rank + 1) * half]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in stack.named_parameters()}, result_file)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_on_combined_batch():
    x = torch.randn(4, 12, 16, dtype=torch.float64)
    single = make_stack(6, dropout=0.0, drop_path=0.0).train()
    loss_of(single, x).backward()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "grads.pt")
        mp.spawn(worker, args=(os.path.join(tmp, "init"), x, result), nprocs=WORLD)
        ddp_grads = torch.load(result)
    for name, p in single.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-9, atol=1e-12)


# Mask R-CNN samples anchors and ROIs at random and normalises some losses by the number it
# sampled, so a DDP step equals a step on the combined batch only when nothing is left to chance
# and every image weighs the same. Hence: all images of one size (no padding that differs
# between the halves), sampling sizes above the number of candidates with a positive fraction of
# 1 (every anchor and every proposal is used, in whatever order randperm picks them), exactly
# POST_NMS proposals per image plus 2 ground-truth boxes, and an ROI foreground threshold of 0.99
# so that only those ground-truth boxes are foreground (equal counts per image for the box and
# mask losses, whose normalisers then add up across processes). No drop path.
MASK_RCNN_DDP_OPTS = [
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 4000, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 16,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 4096, "MODEL.RPN.POSITIVE_FRACTION", 1.0,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 512, "MODEL.ROI_HEADS.POSITIVE_FRACTION", 1.0,
    "MODEL.ROI_HEADS.IOU_THRESHOLDS", [0.99], "MODEL.REV.BACKPROP", "reversible",
]  # fmt: skip
DEMO_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo"
)
TINY_BACKBONES = {
    "rev_vit": ("mask_rcnn_rev_vit_demo.yaml", [
        "MODEL.REVVIT.EMBED_DIM", 48, "MODEL.REVVIT.DEPTH", 2, "MODEL.REVVIT.NUM_HEADS", 2,
        "MODEL.REVVIT.WINDOW_SIZE", 2, "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", [0],
        "MODEL.REVVIT.DROP_PATH_RATE", 0.0,
    ]),
    "rev_mvit": ("mask_rcnn_rev_mvit_demo.yaml", [
        "MODEL.REVMVIT.EMBED_DIM", 16, "MODEL.REVMVIT.DROP_PATH_RATE", 0.0,
    ]),
}  # fmt: skip
IMAGES = 4  # two per process


def mask_rcnn(backbone):
    from detectron2.modeling import build_model

    config_file, opts = TINY_BACKBONES[backbone]
    cfg = yacs_cfg(
        os.path.join(DEMO_DIR, config_file),
        *opts,
        *MASK_RCNN_DDP_OPTS,
        "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
        "MODEL.ROI_MASK_HEAD.CONV_DIM", 32,
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg).train()


def synthetic_batch(size=64):
    """IMAGES images of one size, each with 2 boxes (off the anchor grid) and their masks."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(0)
    batch = []
    for i in range(IMAGES):
        inst = Instances((size, size))
        corners = torch.tensor([[5.3, 7.1, 30.7, 35.9], [29.2, 20.5, 58.6, 50.1]]) + i
        inst.gt_boxes = Boxes(corners)
        inst.gt_classes = torch.tensor([i % 6, (i + 3) % 6])
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, corners.round().long().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


def mask_rcnn_step(model, batch):
    """One training step's losses (backward done) and the per-image ROI sample counts."""
    from detectron2.utils.events import EventStorage

    with EventStorage() as storage:
        loss = sum(model(batch).values())
        loss.backward()
        counts = {k: storage.history(f"roi_head/num_{k}_samples").latest() for k in ("fg", "bg")}
    return loss.item(), counts


def mask_rcnn_worker(rank, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    half = IMAGES // WORLD
    batch = synthetic_batch()[rank * half : (rank + 1) * half]
    results = {}
    for backbone in TINY_BACKBONES:
        model = mask_rcnn(backbone)
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        _, counts = mask_rcnn_step(ddp, batch)
        results[backbone] = {
            "counts": counts,
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
        }
    if rank == 0:
        torch.save(results, result_file)
    dist.destroy_process_group()


def test_ddp_mask_rcnn_gradients_equal_single_process_on_combined_batch(tmp_path):
    """RevViT and RevMViT Mask R-CNN, backprop="reversible": DDP on 2 x 2 images == 1 x 4."""
    mp.spawn(
        mask_rcnn_worker, args=(str(tmp_path / "init"), str(tmp_path / "grads.pt")), nprocs=WORLD
    )
    ddp_results = torch.load(tmp_path / "grads.pt")
    for backbone in TINY_BACKBONES:
        model = mask_rcnn(backbone)
        _, counts = mask_rcnn_step(model, synthetic_batch())
        # The premise of the comparison: only the 2 ground-truth boxes are foreground, and all
        # 16 proposals are sampled as background, in every image of both runs.
        assert counts == ddp_results[backbone]["counts"] == {"fg": 2.0, "bg": 16.0}
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ddp_results[backbone]["grads"].keys()
        assert len(grads) == len([p for p in model.parameters() if p.requires_grad])
        for name, grad in grads.items():
            torch.testing.assert_close(
                ddp_results[backbone]["grads"][name],
                grad,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m: f"{name}: {m}",
            )


@pytest.fixture
def one_process_group(tmp_path):
    """A 1-process gloo group in this process, so that DDP can be built for real."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_find_unused_parameters_fails_in_backward_with_reversible_backprop(one_process_group):
    """Why check_ddp_model refuses it: DDP takes the reversible blocks' parameters for unused."""
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    for backprop, find_unused in (("reversible", False), ("checkpoint", True), ("autograd", True)):
        stack = make_stack(2, dropout=0.0, drop_path=0.0)
        stack.backprop = backprop
        model = DistributedDataParallel(stack, find_unused_parameters=find_unused)
        for _ in range(2):
            loss_of(model, x).backward()
    stack = make_stack(2, dropout=0.0, drop_path=0.0)
    model = DistributedDataParallel(stack, find_unused_parameters=True)
    with pytest.raises(RuntimeError, match="marked as ready twice"):
        for _ in range(2):
            loss_of(model, x).backward()


def test_check_ddp_model_refuses_find_unused_parameters_with_reversible_parts(one_process_group):
    for backbone, owners in (
        ("rev_vit", ["backbone.net.blocks", "backbone"]),
        ("rev_mvit", ["backbone.net"]),
    ):
        model = mask_rcnn(backbone)
        with pytest.raises(ValueError, match="find_unused_parameters=False") as error:
            check_ddp_model(DistributedDataParallel(model, find_unused_parameters=True))
        assert all(repr(owner) in str(error.value) for owner in owners)
        assert reversible_owners(model) == owners
        ddp = DistributedDataParallel(model, find_unused_parameters=False)
        assert check_ddp_model(ddp) is ddp
        assert check_ddp_model(model) is model  # not wrapped: nothing to check
        set_backprop(model, "checkpoint")
        check_ddp_model(DistributedDataParallel(model, find_unused_parameters=True))


def test_reversible_owners_follow_the_nearest_backprop_setting():
    model = mask_rcnn("rev_vit")
    model.backbone.net.backprop = "autograd"  # the trunk stores activations ...
    model.backbone.backprop = "reversible"  # ... the pyramid's couplings still run reversibly
    assert reversible_owners(model) == ["backbone"]
    model.backbone.backprop = "checkpoint"
    assert reversible_owners(model) == []


def test_entry_points_refuse_find_unused_parameters_at_start(one_process_group, tmp_path):
    """As with more than one GPU, where Detectron2's create_ddp_model wraps the model."""
    from detectron2.config import LazyConfig

    import rev_det.runs
    from rev_det.data import ensure_shapes_dataset

    ensure_shapes_dataset(os.environ.get("DETECTRON2_DATASETS", "datasets"))
    # yacs: Detectron2 v0.6's DefaultTrainer offers no find_unused_parameters switch; a user
    # trainer that set it is refused when the Trainer is built.
    train_net = load_entry_point("train_net")
    with mock.patch(
        "detectron2.engine.defaults.create_ddp_model",
        lambda model, **kw: DistributedDataParallel(model, find_unused_parameters=True),
    ), pytest.raises(ValueError, match="find_unused_parameters=True"):
        train_net.Trainer(yacs_cfg(DEMO_YAML, *TINY_YACS, "OUTPUT_DIR", str(tmp_path)))
    # LazyConfig: train.ddp is passed to create_ddp_model, refused before the first step.
    cfg = LazyConfig.apply_overrides(
        LazyConfig.load(DEMO_LAZY),
        TINY_LAZY + ["train.ddp.find_unused_parameters=True", f"train.output_dir={tmp_path}"],
    )
    with mock.patch.object(
        rev_det.runs,
        "create_ddp_model",
        lambda model, fp16_compression, **kw: DistributedDataParallel(model, **kw),
    ), pytest.raises(ValueError, match="find_unused_parameters=True"):
        rev_det.runs.train_lazy(cfg)
