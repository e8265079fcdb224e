"""The reversible engine: equal gradients in all backprop modes, RNG and autocast replay, memory."""

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from rev_det.reversible import BACKPROP_MODES, ReversibleBlock, ReversibleSequence, engine
from rev_det.utils.memory import MemoryTracker


class Block(ReversibleBlock):
    """A small transformer block: F = norm + attention, G = norm + MLP, all with randomness."""

    def __init__(self, dim=16, heads=2, dropout=0.1, drop_path=0.2):
        super().__init__()
        self.heads, self.p = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop_path = StochasticDepth(drop_path, "row")

    def F(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = self.p if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.drop_path(self.proj(x.transpose(1, 2).reshape(b, n, c)))

    def G(self, x):
        x = F.dropout(F.gelu(self.fc1(self.norm2(x))), self.p, self.training)
        return self.drop_path(self.fc2(x))


def make_stack(depth, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return ReversibleSequence([Block(**kw) for _ in range(depth)]).to(dtype)


def run(stack, x, backprop, seed=1):
    """Forward + backward from a fixed RNG state; returns the output and every gradient."""
    stack.backprop = backprop
    x = x.detach().requires_grad_(x.requires_grad)
    stack.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y1, y2 = stack(x, x)
    weights = torch.linspace(-1, 1, y1.numel(), dtype=y1.dtype).view_as(y1)
    ((y1 * weights).sum() + (y2**2).sum()).backward()
    grads = {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}
    if x.requires_grad:
        grads["input"] = x.grad.clone()
    return torch.cat([y1, y2]).detach(), grads


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backprop", ["reversible", "checkpoint"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gradients_match_autograd(backprop, dtype, tol):
    stack = make_stack(10, dtype).train()
    x = torch.randn(2, 12, 16, dtype=dtype, requires_grad=True)
    out_ref, ref = run(stack, x, "autograd")
    out, got = run(stack, x, backprop)
    assert rel_err(out, out_ref) <= tol
    params = {n for n, p in stack.named_parameters()}
    assert set(got) == set(ref) == params | {"input"}
    for name in ref:
        assert rel_err(got[name], ref[name]) <= tol, name


def test_randomness_is_active():
    # The equality above would be vacuous if dropout and drop path never fired.
    stack = make_stack(8).train()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    out_a, _ = run(stack, x, "autograd", seed=1)
    out_b, _ = run(stack, x, "autograd", seed=2)
    assert rel_err(out_a, out_b) > 1e-3


def test_global_rng_stream_as_with_autograd():
    stack = make_stack(8).train()
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    states = {}
    for mode in BACKPROP_MODES:
        run(stack, x, mode)
        states[mode] = torch.get_rng_state()
    assert torch.equal(states["reversible"], states["autograd"])
    assert torch.equal(states["checkpoint"], states["autograd"])


def test_bfloat16_autocast_tracks_autograd():
    """Under bf16 autocast the recomputation replays bf16; gradients agree to bf16 precision.

    Documented tolerance: 5e-2 relative (bf16 has an 8-bit mantissa; forward and recompute
    round the same way but the fp32 streams are rebuilt by subtraction).
    """
    stack = make_stack(8, torch.float32).train()
    x = torch.randn(2, 12, 16, requires_grad=True)
    results = {}
    for mode in ("autograd", "reversible"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[mode] = run(stack, x, mode)
    (out_ref, ref), (out, got) = results["autograd"], results["reversible"]
    assert out.dtype == torch.float32  # the streams stay fp32 under autocast
    assert rel_err(out, out_ref) < 1e-6  # same forward
    for name in ref:
        assert rel_err(got[name], ref[name]) < 5e-2, name


def test_autocast_state_is_replayed(monkeypatch):
    seen = []
    original = Block.G

    def spy(self, x):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, x)

    monkeypatch.setattr(Block, "G", spy)
    stack = make_stack(2, torch.float32).train()
    x = torch.randn(1, 4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = stack(x, x)
    (y1.sum() + y2.sum()).backward()  # outside autocast, as a training loop does
    assert seen == [True] * 4  # 2 in forward, 2 in recomputation


def test_input_without_grad_and_frozen_parameters():
    stack = make_stack(6).train()
    for p in stack[2].parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 12, 16, dtype=torch.float64)  # no grad: backward must still run
    _, ref = run(stack, x, "autograd")
    _, got = run(stack, x, "reversible")
    assert "input" not in got and not any(n.startswith("2.") for n in got)
    assert set(got) == set(ref) and len(got) == 5 * 12  # 5 trainable blocks
    for name in ref:
        assert rel_err(got[name], ref[name]) <= 1e-10, name


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_inference_uses_no_custom_function(mode, monkeypatch):
    def fail(*args):
        raise AssertionError("custom Function used in inference")

    monkeypatch.setattr(engine._ReversibleFunction, "apply", fail)
    stack = make_stack(3)
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    if mode == "eval":
        stack.eval()
        y1, _ = stack(x, x)
        assert y1.grad_fn is not None  # plain autograd graph, traceable ops
    else:
        with torch.no_grad():
            stack.train()(x, x)


def test_reversible_function_is_used_in_training():
    stack = make_stack(3).train()
    x = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    y1, _ = stack(x, x)
    assert type(y1.grad_fn).__name__ == "_ReversibleFunctionBackward"


class ShapeChanging(Block):
    def G(self, x):
        return super().G(x)[:, ::2]


def test_shape_changing_block_is_rejected_at_first_run():
    stack = ReversibleSequence([Block(), ShapeChanging()]).train()
    x = torch.randn(1, 4, 16, requires_grad=True)
    for backprop in BACKPROP_MODES:
        stack.backprop = backprop
        with pytest.raises(ValueError, match=r"ShapeChanging\.G .* must preserve shape"):
            stack(x, x)


def test_bad_blocks_and_modes_are_rejected():
    with pytest.raises(TypeError, match="not a ReversibleBlock"):
        ReversibleSequence([Block(), nn.Linear(16, 16)])
    with pytest.raises(ValueError, match="valid modes"):
        ReversibleSequence([Block()], backprop="revesible")


def activation_peak(depth, backprop):
    """Peak bytes of forward + backward with frozen weights (no parameter gradients)."""
    stack = make_stack(depth, torch.float32, dim=64, heads=4).train()
    stack.requires_grad_(False)
    stack.backprop = backprop
    x = torch.randn(2, 256, 64, requires_grad=True)
    with MemoryTracker() as mem:
        y1, y2 = stack(x, x)
        (y1.sum() + y2.sum()).backward()
    return mem.peak


def test_reversible_activation_memory_is_flat_in_depth():
    rev = activation_peak(16, "reversible") / activation_peak(4, "reversible")
    plain = activation_peak(16, "autograd") / activation_peak(4, "autograd")
    assert rev <= 1.05, rev
    assert plain >= 3.0, plain


def test_engine_does_not_depend_on_detectron2():
    root = pathlib.Path(engine.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith(("detectron2", "rev_det.modeling")) for n in names)


def step_peak_with_existing_grads(depth):
    """Peak of a second training step, when every parameter already has a .grad (as under DDP
    or gradient accumulation): gradients must be accumulated block by block, not all at once."""
    stack = make_stack(depth, torch.float32, dim=64, heads=4).train()
    x = torch.randn(2, 256, 64, requires_grad=True)
    for _ in range(2):
        with MemoryTracker() as mem:
            y1, y2 = stack(x, x)
            (y1.sum() + y2.sum()).backward()
    return mem.peak


def test_existing_gradients_are_accumulated_in_place_block_by_block():
    assert step_peak_with_existing_grads(16) / step_peak_with_existing_grads(4) <= 1.05
