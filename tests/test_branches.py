"""recomputed_branches: several outputs sharing a prefix, as one recomputed unit."""

import pytest
import torch
from helpers import rel_err
from torch import nn

from rev_det.reversible import recomputed_branches
from rev_det.utils.memory import MemoryTracker


class Branched(nn.Module):
    """A prefix (linear + tanh, counted) and three branches, one with dropout."""

    def __init__(self, dim=16, dtype=torch.float64):
        super().__init__()
        self.prefix = nn.Linear(2 * dim, dim, dtype=dtype)
        self.branches = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(dim, dim, dtype=dtype), nn.GELU()),
                nn.Sequential(nn.Dropout(0.5), nn.Linear(dim, dim, dtype=dtype)),
                nn.Linear(dim, 3, dtype=dtype),
            ]
        )
        self.prefix_runs = 0

    def shared(self, a, b):
        self.prefix_runs += 1
        return torch.tanh(self.prefix(torch.cat([a, b], dim=-1)))

    def forward(self, a, b, recompute):
        if recompute:
            return recomputed_branches(self.shared, list(self.branches), (a, b), self)
        shared = self.shared(a, b)
        return tuple(branch(shared) for branch in self.branches)


def step(model, a, b, recompute, used=(0, 1, 2), seed=3):
    """Forward + backward from a fixed RNG state; the outputs and every gradient."""
    model.zero_grad(set_to_none=True)
    a, b = (x.detach().requires_grad_(x.requires_grad) for x in (a, b))
    torch.manual_seed(seed)
    outputs = model(a, b, recompute)
    loss = sum((outputs[i] * torch.linspace(-1, 1, outputs[i].shape[-1])).sum() for i in used)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads.update({n: x.grad for n, x in (("a", a), ("b", b)) if x.grad is not None})
    return [o.detach() for o in outputs], grads


def inputs(requires_grad=True):
    torch.manual_seed(0)
    return [torch.randn(4, 16, dtype=torch.float64, requires_grad=requires_grad) for _ in "ab"]


@pytest.mark.parametrize("used", [(0, 1, 2), (1,), (0, 2)])
def test_outputs_and_float64_gradients_equal_autograd(used):
    """Dropout draws the forward's mask again; an output without gradient gives none."""
    model = Branched().train()
    ref_out, ref = step(model, *inputs(), recompute=False, used=used)
    out, got = step(model, *inputs(), recompute=True, used=used)
    for o, r in zip(out, ref_out):
        assert torch.equal(o, r)
    assert got.keys() == ref.keys() and {"a", "b", "prefix.weight"} <= got.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-12, msg=name)


def test_the_global_generator_ends_as_with_autograd():
    model = Branched().train()
    step(model, *inputs(), recompute=False)
    after_autograd = torch.rand(3)
    step(model, *inputs(), recompute=True)
    assert torch.equal(torch.rand(3), after_autograd)


def test_prefix_runs_three_times_per_step_whatever_the_branches():
    model = Branched().train()
    step(model, *inputs(), recompute=True)
    assert model.prefix_runs == 3  # forward; once for the branches; once under autograd


def test_nothing_but_the_outputs_is_kept_till_backward():
    model = Branched(dim=256).train().requires_grad_(False)
    torch.manual_seed(0)
    a, b = (torch.randn(64, 256, dtype=torch.float64, requires_grad=True) for _ in "ab")
    with MemoryTracker() as mem:
        outputs = model(a, b, recompute=True)
        stored = mem.current
    assert stored == sum(o.numel() * o.element_size() for o in outputs)


def test_frozen_inputs_still_train_the_parameters():
    model = Branched().train()
    _, ref = step(model, *inputs(requires_grad=False), recompute=False)
    _, got = step(model, *inputs(requires_grad=False), recompute=True)
    assert "a" not in got and got.keys() == ref.keys()
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, rtol=1e-12, atol=1e-12, msg=name)


def test_bfloat16_autocast_is_replayed_in_backward(monkeypatch):
    """The branches re-run in the forward's autocast dtype, so gradients match autograd's."""
    model = Branched(dtype=torch.float32).train()
    a, b = (x.float().detach().requires_grad_() for x in inputs())
    seen = []
    linear = model.branches[2]
    forward = linear.forward
    monkeypatch.setattr(linear, "forward", lambda x: seen.append(x.dtype) or forward(x))

    def grads(recompute):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same dropout mask in both
        with torch.autocast("cpu", torch.bfloat16):
            out = model(a, b, recompute)
        sum(o.float().sum() for o in out).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref, got = grads(False), grads(True)
    assert seen[1:] == [torch.bfloat16] * 2  # forward, then the re-run in backward
    for name, g in ref.items():
        # bfloat16 sums the branches' gradients in another order: rounding, ~3e-3 here.
        assert rel_err(got[name], g) <= 2e-2, name


def test_parameter_gradient_hooks_fire_once_per_backward():
    """As DistributedDataParallel needs: each parameter reported ready once."""
    model = Branched().train()
    fired = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: fired.append(name))
    step(model, *inputs(), recompute=True)
    assert sorted(fired) == sorted(n for n, _ in model.named_parameters())
