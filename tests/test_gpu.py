"""The engine and mixed precision training on CUDA (skipped without a GPU).

Gradients equal across backprop modes and with the parallel (two-stream) backward, bf16
autocast, peak memory ordering of the modes, and RevAMPTrainer steps of a small Mask R-CNN.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.modeling import build_model
from helpers import Block, fake_batch, rel_err, tiny_cfg
from torch.nn.attention import SDPBackend, sdpa_kernel

from rev_det.reversible import ReversibleBlock, ReversibleSequence, schedule
from rev_det.solver import build_optimizer
from rev_det.training import RevAMPTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"


class CudaBlock(Block):
    """The test block without attention dropout (CUDA attention kernels chosen with and without
    grad may draw their dropout masks differently); MLP dropout and drop path stay random."""

    def F(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.drop_path(self.proj(x.transpose(1, 2).reshape(b, n, c)))


def cuda_stack(depth, dim=64, heads=4, seed=0, **kw):
    torch.manual_seed(seed)
    return ReversibleSequence([CudaBlock(dim, heads, **kw) for _ in range(depth)]).to(DEVICE)


def run(stack, x, backprop, parallel=False, seed=1):
    """Forward + backward from a fixed RNG state (CPU and CUDA); output and every gradient."""
    stack.backprop, stack.parallel_backward = backprop, parallel
    x = x.detach().requires_grad_(True)
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y1, y2 = stack(x, x)
    weights = torch.linspace(-1, 1, y1.numel(), device=y1.device).view_as(y1)
    ((y1 * weights).sum() + (y2.float() ** 2).sum()).backward()
    grads = {n: p.grad.float().clone() for n, p in stack.named_parameters()}
    grads["input"] = x.grad.float().clone()
    return torch.cat([y1, y2]).detach().float(), grads


def test_parallel_backward_uses_two_cuda_streams():
    (main, side), lookahead = schedule.select_lanes(torch.device(DEVICE), parallel=True)
    assert lookahead == 1 and main.stream == torch.cuda.current_stream()
    assert side.stream != main.stream
    (serial, _), lookahead = schedule.select_lanes(torch.device(DEVICE), parallel=False)
    assert lookahead == 0 and serial is schedule.SERIAL


def test_gradients_equal_across_modes_float32():
    # The math attention kernel is deterministic; the others may reduce in varying order.
    stack = cuda_stack(8, dim=256, heads=4).train()
    x = torch.randn(4, 1024, 256, device=DEVICE)
    with sdpa_kernel([SDPBackend.MATH]):
        out_ref, ref = run(stack, x, "autograd")
        results = {
            "checkpoint": run(stack, x, "checkpoint"),
            "reversible": run(stack, x, "reversible"),
            "parallel": run(stack, x, "reversible", parallel=True),
        }
    for mode, (out, grads) in results.items():
        assert rel_err(out, out_ref) <= 1e-5, mode
        for name in ref:
            assert rel_err(grads[name], ref[name]) <= 1e-4, (mode, name)
    # The parallel backward does the serial one's arithmetic, only on two streams.
    serial, parallel = results["reversible"][1], results["parallel"][1]
    for name in serial:
        assert rel_err(parallel[name], serial[name]) <= 1e-6, name


def test_parallel_backward_is_repeatable_on_large_tensors():
    # Large kernels keep both streams busy at once: a missing wait or an early reuse of memory
    # would show up as a difference between runs or from the serial backward.
    stack = cuda_stack(12, dim=512, heads=8, dropout=0.0).train()
    x = torch.randn(8, 1024, 512, device=DEVICE)
    with sdpa_kernel([SDPBackend.MATH]):
        _, serial = run(stack, x, "reversible")
        for _ in range(3):
            _, parallel = run(stack, x, "reversible", parallel=True)
            for name in serial:
                assert rel_err(parallel[name], serial[name]) <= 1e-6, name


@pytest.mark.parametrize("parallel", [False, True])
def test_bfloat16_autocast_tracks_autograd(parallel):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    stack = cuda_stack(8, dim=128, heads=4).train()
    x = torch.randn(2, 256, 128, device=DEVICE)
    results = {}
    for mode in ("autograd", "reversible"):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            results[mode] = run(stack, x, mode, parallel=parallel)
    (out_ref, ref), (out, got) = results["autograd"], results["reversible"]
    # The same forward, up to the rounding of the attention kernel picked with or without grad.
    assert torch.isfinite(out).all() and rel_err(out, out_ref) < 1e-2
    for name in ref:
        assert torch.isfinite(got[name]).all(), name
        assert rel_err(got[name], ref[name]) < 5e-2, name


def peak_bytes(depth, backprop, parallel=False):
    """Peak CUDA memory of forward + backward with frozen weights: activations only."""
    stack = cuda_stack(depth, dim=256, heads=4).train()
    stack.requires_grad_(False)
    stack.backprop, stack.parallel_backward = backprop, parallel
    x = torch.randn(4, 1024, 256, device=DEVICE, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    y1, y2 = stack(x, x)
    (y1.sum() + y2.sum()).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_peak_memory_reversible_below_checkpoint_below_autograd():
    peaks = {mode: peak_bytes(24, mode) for mode in ("reversible", "checkpoint", "autograd")}
    assert peaks["reversible"] < peaks["checkpoint"] < peaks["autograd"], peaks
    # Two functions' activations at a time instead of one: still far below checkpointing.
    assert peak_bytes(24, "reversible", parallel=True) < peaks["checkpoint"]


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_amp_training_steps_of_a_small_mask_rcnn(precision):
    if precision == "bfloat16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    cfg = tiny_cfg(
        "MODEL.DEVICE", DEVICE, "MODEL.REV.PARALLEL_BACKWARD", True,
        "SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", precision,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    blocks = [m for m in model.modules() if isinstance(m, ReversibleBlock)]
    before = [[p.detach().clone() for p in b.parameters()] for b in blocks]
    data = itertools.repeat(fake_batch(((192, 256), (200, 249))))
    trainer = RevAMPTrainer(cfg, model, data, build_optimizer(cfg, model))
    trainer.train(0, 3)
    assert trainer.device_type == DEVICE
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    for block, old in zip(blocks, before):
        assert any(not torch.equal(p, q) for p, q in zip(block.parameters(), old))
