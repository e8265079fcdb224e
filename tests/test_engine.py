"""The reversible engine: equal gradients in all backprop modes, RNG and autocast replay, memory."""

import ast
import collections
import contextlib
import logging
import pathlib

import pytest
import torch
from helpers import Block, make_stack, rel_err
from torch import nn

from rev_det.reversible import BACKPROP_MODES, ReversibleSequence, drift, engine, schedule
from rev_det.utils.memory import MemoryTracker


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
    with pytest.raises(ValueError, match=r"backprop = .revesible. is not valid; choose one of"):
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


def test_autocast_keeps_no_half_precision_copy_of_the_weights():
    """Autocast caches the half-precision cast of each weight until its region ends; over a
    reversible sequence's forward or backward that would be a bfloat16 copy of every block's
    weights, more than the few activations the engine keeps. The engine turns the cache off:
    one block's cast weights (a sixteenth of the copy here) are alive at a time."""
    stack = make_stack(16, torch.float32, dim=256, heads=4).train()
    stack.backprop = "reversible"
    copy = sum(p.numel() for p in stack.parameters()) * 2  # bytes of a bfloat16 copy
    x = torch.randn(1, 16, 256, requires_grad=True)
    with MemoryTracker(grads_of=list(stack.parameters())) as mem:
        with torch.autocast("cpu", torch.bfloat16):
            y1, y2 = stack(x, x)
        (y1.float().sum() + y2.float().sum()).backward()
    assert mem.activation_peak < copy / 4, (mem.activation_peak, copy)


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


def test_inverse_rebuilds_the_input():
    stack = make_stack(3).eval()
    x1, x2 = torch.randn(2, 2, 12, 16, dtype=torch.float64)
    y1, y2 = stack[0](x1, x2)
    r1, r2 = stack[0].inverse(y1, y2)
    assert rel_err(r1, x1) < 1e-13 and rel_err(r2, x2) < 1e-13


def test_recomputation_runs_in_the_forward_autocast_dtype(monkeypatch):
    seen = []
    original = Block.F

    def spy(self, x):
        out = original(self, x)
        seen.append((torch.is_grad_enabled(), out.dtype))
        return out

    monkeypatch.setattr(Block, "F", spy)
    stack = make_stack(2, torch.float32, dropout=0.0).train()
    x = torch.randn(1, 4, 16, requires_grad=True)
    for dtype in (torch.bfloat16, torch.float16):
        seen.clear()
        with torch.autocast("cpu", dtype=dtype):
            y1, y2 = stack(x, x)
        (y1.sum() + y2.sum()).backward()
        # Forward (grad off inside the Function), then the re-runs (grad on), all in `dtype`.
        assert seen == [(False, dtype)] * 2 + [(True, dtype)] * 2


class Poisoned(Block):
    """G returns inf when it is re-run in backward (grad enabled), and is finite in forward."""

    def G(self, x):
        out = super().G(x)
        return out * float("inf") if torch.is_grad_enabled() else out


def test_non_finite_recomputation_names_the_block():
    torch.manual_seed(0)
    stack = ReversibleSequence([Block(), Block(), Poisoned(), Block()]).double().train()
    x = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    y1, y2 = stack(x, x)
    with pytest.raises(engine.ReconstructionError, match=r"block 2 of a 4-block sequence \(Poi"):
        (y1.sum() + y2.sum()).backward()
    engine.name_reversible_blocks(stack, prefix="trunk.blocks")
    y1, y2 = stack(x, x)
    with pytest.raises(FloatingPointError) as error:  # Detectron2's non-finite error type
        (y1.sum() + y2.sum()).backward()
    message = str(error.value)
    assert "('trunk.blocks.2', Poisoned)" in message and "X2 = Y2 - G(Y1)" in message
    assert 'backprop="checkpoint"' in message and "learning rate" in message


def test_non_finite_forward_output_is_reported_as_such():
    stack = make_stack(3).train()
    x = torch.randn(1, 4, 16, dtype=torch.float64, requires_grad=True)
    y1, y2 = stack(x * float("nan"), x)
    with pytest.raises(engine.ReconstructionError, match="not finite in forward"):
        (y1.sum() + y2.sum()).backward()


class FakeLane(schedule.Lane):
    """A stand-in CUDA stream that records, with vector clocks, what would run after what.

    Each operation on a lane (a function re-run, a gradient through it) gets the lane's vector
    clock; ``wait`` merges the clock of an event of another lane. Operation a happens before b
    iff a's own entry is at most b's entry for a's lane.
    """

    current = None

    def __init__(self, name):
        self.name, self.clock, self.received = name, collections.Counter(), set()

    @contextlib.contextmanager
    def run(self):
        previous, FakeLane.current = FakeLane.current, self
        yield
        FakeLane.current = previous

    def op(self):
        self.clock[self.name] += 1
        return self.name, dict(self.clock)

    def mark(self):
        return dict(self.clock)

    def wait(self, event):
        for lane, count in event.items():
            self.clock[lane] = max(self.clock[lane], count)

    def wait_all(self, other):
        self.wait(other.mark())

    def receive(self, tensor):
        self.received.add(tensor.data_ptr())


def happens_before(a, b):
    (lane, clock_a), (_, clock_b) = a, b
    return clock_a[lane] <= clock_b.get(lane, 0)


class Traced(Block):
    """Logs each re-run of F or G and each gradient through it, with the lane it runs on."""

    log = {}

    def F(self, x):
        return self.trace("F", x, super().F(x))

    def G(self, x):
        return self.trace("G", x, super().G(x))

    def trace(self, name, x, out):
        lane = FakeLane.current
        if lane is None:  # the forward
            return out
        key = (self.index, name)
        Traced.log[("rebuild", key)] = lane.op()
        Traced.log[("input", key)] = (x.data_ptr(), lane)

        def hook(grad):
            Traced.log[("backprop", key)] = FakeLane.current.op()
            Traced.log[("grad", key)] = (grad.data_ptr(), FakeLane.current)

        out.register_hook(hook)
        return out


def test_parallel_schedule_keeps_data_dependencies_across_lanes(monkeypatch):
    """The two-stream schedule, on CPU with stand-in streams: every data dependency is ordered
    by waits, cross-lane tensors are received, the gradients are bit for bit the serial ones,
    and rebuilding the next step can overlap with back-propagating the current one."""
    torch.manual_seed(0)
    blocks = [Traced() for _ in range(4)]
    for i, block in enumerate(blocks):
        block.index = i
    stack = ReversibleSequence(blocks, parallel_backward=True).double().train()
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    out, serial = run(stack, x, "reversible")
    main, side = FakeLane("main"), FakeLane("side")
    monkeypatch.setattr(schedule, "select_lanes", lambda device, parallel: ((main, side), 1))
    Traced.log.clear()
    start = main.op()  # e.g. the optimizer step that last wrote the parameters
    out_p, parallel = run(stack, x, "reversible")
    end = main.op()  # e.g. the next optimizer step, reading the gradients
    assert torch.equal(out_p, out) and parallel.keys() == serial.keys()
    for name in serial:
        assert torch.equal(parallel[name], serial[name]), name

    log = Traced.log
    order = [(i, name) for i in reversed(range(4)) for name, _ in engine.INVERSE_STEPS]
    assert {log[("rebuild", key)][0] for key in order} == {"main", "side"}
    for k, key in enumerate(order):
        rebuild, backprop = log[("rebuild", key)], log[("backprop", key)]
        assert happens_before(start, rebuild) and happens_before(backprop, end)
        assert happens_before(rebuild, backprop)
        if k:
            previous = order[k - 1]
            assert happens_before(log[("rebuild", previous)], rebuild)
            assert happens_before(log[("backprop", previous)], backprop)
            # It reads the stream and the gradient the previous step made, on the other lane.
            for kind in ("input", "grad"):
                ptr, lane = log[(kind, key)]
                assert ptr in lane.received, (kind, key)
        if k + 1 < len(order):
            following = log[("rebuild", order[k + 1])]
            assert not happens_before(following, backprop)
            assert not happens_before(backprop, following)


def test_parallel_backward_on_cpu_runs_serially_and_says_so(caplog):
    stack = make_stack(4).train()
    x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
    _, serial = run(stack, x, "reversible")
    stack.parallel_backward = True
    schedule._log_serial_fallback.cache_clear()
    with caplog.at_level(logging.INFO, logger=schedule.__name__):
        _, parallel = run(stack, x, "reversible")
        run(stack, x, "reversible")
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "runs serially" in caplog.records[0].message
    for name in serial:
        assert torch.equal(parallel[name], serial[name]), name


def test_reconstruction_drift_is_measured_by_the_backward_steps():
    torch.manual_seed(0)
    stack = make_stack(6, torch.float32).eval()
    x1, x2 = torch.randn(2, 2, 12, 16)
    errors = drift.measure_reconstruction(list(stack), x1, x2)
    assert errors.shape == (6, 2) and errors.dtype == torch.float32
    # The same errors as a chain of ReversibleBlock.inverse (eval mode: no random draws).
    inputs, y = [], (x1, x2)
    for block in stack:
        inputs.append(y)
        y = block(*y)
    expected = []
    for block, true in zip(reversed(stack), reversed(inputs)):
        y = block.inverse(*y)
        expected.append(drift._relative_errors(y, true))
    assert torch.equal(errors, torch.stack(expected[::-1]))
    assert 0 < errors[0, 0] < 1e-5


def test_drift_measurement_replays_randomness_and_leaves_the_generators_alone():
    stack = make_stack(6).train()  # float64, dropout and drop path active
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    state = torch.get_rng_state()
    errors = drift.measure_reconstruction(list(stack), x, x)
    assert torch.equal(torch.get_rng_state(), state)
    assert errors.max() < 1e-12  # different draws in the re-runs would give O(1) errors


def test_sequence_inputs_are_recorded_once_and_only_when_rebuilt():
    stack = make_stack(3).train()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    stack(x, x)  # outside the context: nothing kept
    with drift.record_sequence_inputs() as records:
        stack(x, x)
        stack.backprop = "checkpoint"  # nothing is rebuilt: nothing to measure
        stack(x, x)
        stack.backprop = "reversible"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            stack(x * 2, x)  # the same sequence again: the first input is kept
        stack.eval()(x, x)
    assert len(records) == 1 and records[0].blocks == tuple(stack)
    assert torch.equal(records[0].x1, x) and not records[0].x1.requires_grad
    assert records[0].measure().shape == (3, 2)
    assert not engine.REBUILT_SEQUENCE_OBSERVERS


def test_parameter_gradient_hooks_fire_once_per_backward():
    """DistributedDataParallel reduces a parameter's gradient when its AccumulateGrad node runs;
    a second run in the same backward is an error ("mark a variable ready only once")."""
    stack = make_stack(3).train()
    runs, nodes = collections.Counter(), []
    for name, p in stack.named_parameters():
        node = p.view_as(p).grad_fn.next_functions[0][0]  # the parameter's AccumulateGrad
        node.register_hook(lambda grad_inputs, grad_outputs, name=name: runs.update([name]))
        nodes.append(node)
    x = torch.randn(1, 4, 16, dtype=torch.float64)  # no grad: backward must run anyway
    y1, y2 = stack(x, x)
    (y1 * y2).sum().backward()
    assert runs == {name: 1 for name, _ in stack.named_parameters()}


class ScaledConcat(engine.SequenceOutput):
    """cat(y1, y2) * scale, inverted from itself alone (or not at all, with ``invertible``
    False)."""

    def __init__(self, scale: nn.Parameter, invertible: bool):
        self.scale, self.invertible = scale, invertible

    def __call__(self, y1, y2):
        return torch.cat([y1, y2], dim=-1) * self.scale

    def parameters(self):
        return [self.scale]

    def forward_kept(self, y1, y2):
        return self(y1, y2), (() if self.invertible else None)

    def inverse(self, out, kept):
        return (out / self.scale).chunk(2, dim=-1)


@pytest.mark.parametrize("invertible", [True, False])
def test_a_sequence_output_is_kept_instead_of_the_streams(invertible):
    """Same float64 gradients as autograd (the output's parameter included); what is kept till
    backward is the output when it can be inverted, the streams otherwise."""
    stack = make_stack(4, dim=8).train()
    scale = nn.Parameter(torch.linspace(0.5, 2.0, 16, dtype=torch.float64))
    x = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    grads, kept = {}, {}
    for mode in ("autograd", "reversible"):
        stack.zero_grad(set_to_none=True)
        scale.grad = x.grad = None
        torch.manual_seed(1)
        with MemoryTracker() as mem:
            out = engine.reversible_sequence(
                list(stack), x, x, mode, output=ScaledConcat(scale, invertible)
            )
            kept[mode] = mem.current
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads[mode] = [x.grad, scale.grad, *(p.grad for p in stack.parameters())]
    for got, ref in zip(grads["reversible"], grads["autograd"], strict=True):
        assert rel_err(got, ref) <= 1e-10
    out_bytes = out.numel() * out.element_size()
    assert kept["reversible"] == (out_bytes if invertible else 2 * out_bytes)
