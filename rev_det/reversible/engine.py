"""Reversible backpropagation for two-stream residual networks.

A reversible block holds two streams and updates them with additive couplings::

    Y1 = X1 + F(X2)
    Y2 = X2 + G(Y1)

and its input can be rebuilt from its output (:meth:`ReversibleBlock.inverse`)::

    X2 = Y2 - G(Y1)
    X1 = Y1 - F(X2)

(the ``+`` is the block's :class:`Coupling`: additive by default; a :class:`ScaledCoupling`
computes ``Y1 = beta X1 + alpha X2 + F(X2)`` and is undone by dividing by ``beta``.)

So a sequence of such blocks needs to keep only its last output for backward; or, when the
sequence ends in a map that can be inverted (:class:`SequenceOutput`, e.g. the streams
concatenated and normalised), only that map, which its consumer keeps anyway, and what inverts
it. Walking the blocks in reverse, each block's input is rebuilt, F and G are re-run under
autograd, and the gradients flow one block at a time: activation memory is O(1) in depth
instead of O(depth), for the price of one extra forward of F and G per block.

Three ways to back-propagate through the same blocks (same parameters, outputs and
gradients; only memory and time differ) are selected by ``backprop``:

* ``"reversible"``: :class:`_ReversibleFunction`, which stores only the sequence's output;
* ``"autograd"``: ordinary autograd, every activation stored;
* ``"checkpoint"``: :func:`torch.utils.checkpoint.checkpoint` around each block, which stores
  each block's input.

The reversible backward takes the inverse apart into steps, one per function: G, then F, of
the last block, then of the one before, and so on. A step (:class:`_Step`)

1. *rebuilds* a stream: it re-runs its function under autograd on the stream the function
   reads and subtracts the result from the other stream, exactly as the inverse does;
2. *back-propagates* through that re-run: the gradient of the rebuilt stream flows through the
   function into the stream it read, and into the parameters.

Serially each step rebuilds, then back-propagates, so one function's activations are alive at
a time. With ``parallel_backward`` on CUDA (the PaReprop idea), step k + 1 is rebuilt on one
CUDA stream while step k back-propagates on another (:mod:`rev_det.reversible.schedule`): the
same arithmetic on the same tensors, so the same gradients, with two functions' activations
alive.

Recomputation replays the forward exactly: the CPU and CUDA random number generator states
seen by F and G in forward are restored around their re-runs (dropout and drop path draw the
same masks), and so is the forward's autocast state. The global generators are left as they
would be after ordinary autograd. Forward and recomputation run with autocast's weight-cast
cache off: a reversible sequence uses each weight once per pass, so the cache saves no cast,
but it would keep a half-precision copy of every block's weights until the autocast region
ends (the whole sequence's backward, or the caller's whole forward). In eval mode or without grad no custom Function is used.

Reconstruction is watched: a rebuilt stream that is not finite raises
:class:`ReconstructionError` naming the block (one device-to-host copy per sequence, at the
end of its backward). How far rebuilt inputs drift from the true ones (in half precision the
subtraction is not exact) is measured by :mod:`rev_det.reversible.drift`.

This module depends on torch only.
"""

import contextlib
import logging
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

from . import schedule
from .modes import BackpropModule, check_backprop, recomputes

__all__ = [
    "ADDITIVE",
    "Coupling",
    "ReconstructionError",
    "ReversibleBlock",
    "ScaledCoupling",
    "ReversibleSequence",
    "SequenceOutput",
    "check_invertible",
    "describe_block",
    "name_reversible_blocks",
    "reversible_sequence",
]

logger = logging.getLogger(__name__)


# The inverse of a block, step by step: (function, the stream it reads). Each step subtracts the
# function of the stream it reads from the other stream: X2 = Y2 - G(Y1), then X1 = Y1 - F(X2).
INVERSE_STEPS = (("G", 0), ("F", 1))

# Called as f(blocks, x1, x2) by every sequence whose inputs the backward will rebuild (once per
# forward); rev_det.reversible.drift.record_sequence_inputs adds one to measure the drift.
REBUILT_SEQUENCE_OBSERVERS: List[Callable] = []


class ReconstructionError(FloatingPointError):
    """A reversible block's input could not be rebuilt from its output (non-finite or drifted).

    A :class:`FloatingPointError`, like Detectron2's error for a non-finite loss.
    """


class Coupling:
    """How a block's function output joins the streams: the additive coupling
    ``out = skip + f(read)`` (RevViT's; :data:`ADDITIVE`).

    Each of a block's two functions reads one stream (``read``) and updates the other
    (``skip``): for F, skip = X1 and read = X2; for G, skip = X2 and read = Y1. A coupling says
    how (:meth:`couple`), how to undo it (:meth:`uncouple`), and how the gradient of its output
    splits between the two streams (:meth:`grads`; the part through ``f`` is autograd's).
    :class:`ScaledCoupling` is the other one.
    """

    def couple(self, skip: torch.Tensor, read: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """The updated stream from the one it updates, the one ``f`` read and ``f(read)``."""
        return skip + fx

    def uncouple(self, out: torch.Tensor, read: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """``skip`` back from :meth:`couple`'s output, ``read`` and ``f(read)``."""
        return out - fx

    def grads(
        self, grad_out: torch.Tensor, grad_read: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The gradients of ``skip`` and of ``read`` (before ``f``'s part is added) from the
        gradient of the output and the gradient ``read`` already has."""
        return grad_out, grad_read

    def skip_scale(self) -> Optional[torch.Tensor]:
        """The factor on ``skip`` (β), or None where it is 1; the inverse divides by it."""
        return None


# RevViT's coupling (and every block's unless it says otherwise): the same arithmetic as
# before couplings had a name, so its results are unchanged to the bit.
ADDITIVE = Coupling()


class ScaledCoupling(nn.Module, Coupling):
    """``out = beta * skip + alpha * read + f(read)``: a residual network's block and a
    reversible one in one formula (Dr2Net, Zhao et al., CVPR 2024).

    At ``(alpha, beta) = (1, 0)`` a block ``Y1 = X1·0 + X2 + F(X2)``, ``Y2 = X2·0 + Y1 + G(Y1)``
    is an ordinary pre-norm transformer block applied to X2 (``Y2 = block(X2)``, X1 ignored); at
    ``(0, 1)`` it is RevViT's additive coupling. It is invertible whenever ``beta != 0``:
    ``skip = (out - alpha * read - f(read)) / beta``, which divides the rounding error of
    ``out`` by ``beta`` at every step (see ``docs/vitdet_surrogate.md``).

    ``alpha`` and ``beta`` are buffers (saved in checkpoints, moved with the model); a schedule
    sets them during training (``rev_det.training.CouplingSchedule``).

    Args:
        alpha: the factor on the stream the function reads.
        beta: the factor on the stream the function updates.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0):
        super().__init__()
        # float64, so that the values are exact in a float64 model; a float32 model's
        # arithmetic stays float32 (a 0-dim tensor does not promote its operands).
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float64))
        self.register_buffer("beta", torch.tensor(float(beta), dtype=torch.float64))

    def couple(self, skip, read, fx):
        return self.beta * skip + self.alpha * read + fx

    def uncouple(self, out, read, fx):
        return (out - self.alpha * read - fx) / self.beta

    def grads(self, grad_out, grad_read):
        return self.beta * grad_out, grad_read + self.alpha * grad_out

    def skip_scale(self):
        return self.beta

    def set(self, alpha: float, beta: float):
        """Set both coefficients in place (no new tensors: optimizers and DDP keep theirs)."""
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):g}, beta={float(self.beta):g}"


class ReversibleBlock(nn.Module):
    """A two-stream block with couplings ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``.

    Subclasses define :meth:`F` and :meth:`G`. Both must return a tensor of the shape of their
    input, and must be deterministic given the random number generator state (dropout and drop
    path are fine: the engine replays the generator state in recomputation).

    The coupling, the ``+`` above, is the block's :attr:`coupling`: additive by default
    (:data:`ADDITIVE`); a block with a :class:`ScaledCoupling` computes
    ``Y1 = beta X1 + alpha X2 + F(X2)``, ``Y2 = beta X2 + alpha Y1 + G(Y1)``. The engine runs
    every coupling through it, forward, inverse and backward.

    Attributes:
        qualified_name: the block's name in its model (e.g. ``"backbone.net.blocks.3"``), set by
            :func:`name_reversible_blocks`; error messages use it.
    """

    qualified_name: Optional[str] = None

    @property
    def coupling(self) -> Coupling:
        """The block's :class:`Coupling`: a sub-module named ``coupling`` (e.g. a
        :class:`ScaledCoupling`, assigned as ``self.coupling = ...``), else :data:`ADDITIVE`."""
        return self._modules.get("coupling", ADDITIVE)

    def F(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the paper's name)
        raise NotImplementedError

    def G(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the paper's name)
        raise NotImplementedError

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y1 = _couple(x1, x2, self.F(x2), self, "F")
        y2 = _couple(x2, y1, self.G(y1), self, "G")
        return y1, y2

    def inverse(self, y1: torch.Tensor, y2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The block's input from its output: ``X2 = Y2 - G(Y1)``, then ``X1 = Y1 - F(X2)``.

        The reversible backward takes the same steps (:data:`INVERSE_STEPS`, :func:`_uncouple`)
        one at a time, re-running each function under autograd. In training mode F and G must
        draw the random numbers of the forward (the backward replays them; here the caller
        does). In floating point the rebuilt input differs from the true one by rounding, more so
        in half precision: see :func:`rev_det.reversible.drift.measure_reconstruction`.
        """
        streams = (y1, y2)
        for name, source in INVERSE_STEPS:
            streams = _uncouple(self, streams, source, getattr(self, name)(streams[source]))
        return streams


def _couple(
    x: torch.Tensor, read: torch.Tensor, fx: torch.Tensor, block: ReversibleBlock, name: str
) -> torch.Tensor:
    # A shape change would broadcast silently or fail deep inside autograd; say why instead.
    if fx.shape != x.shape:
        raise ValueError(
            f"{type(block).__name__}.{name} maps a tensor of shape {tuple(x.shape)} to "
            f"{tuple(fx.shape)}; a reversible block's F and G must preserve shape. Run blocks "
            "that change shape (e.g. stage transitions) outside the reversible sequence."
        )
    return block.coupling.couple(x, read, fx)


def _uncouple(block: ReversibleBlock, streams, source: int, fx: torch.Tensor):
    """One step of the inverse: the stream other than ``source`` is uncoupled from ``fx``."""
    streams = list(streams)
    streams[1 - source] = block.coupling.uncouple(streams[1 - source], streams[source], fx)
    return tuple(streams)


class SequenceOutput:
    """One tensor made of a reversible sequence's two output streams (e.g. their concatenation,
    normalised), returned by the sequence instead of the streams.

    In "reversible" mode the sequence then keeps that tensor for backward, which its consumer
    keeps anyway, and what :meth:`forward_kept` returns beside it, instead of the streams, and
    :meth:`inverse` gives the streams back. An output that cannot be inverted at the moment
    (``forward_kept`` returns None beside it) makes the sequence keep its streams, as without
    an output. In backward the output is re-run under autograd on the streams, so it must not
    draw random numbers.
    """

    def __call__(self, y1: torch.Tensor, y2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def parameters(self) -> List[nn.Parameter]:
        """The parameters the output uses (their gradients are accumulated in backward)."""
        return []

    def forward_kept(
        self, y1: torch.Tensor, y2: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
        """The output, and what :meth:`inverse` needs beside it (None: not invertible now)."""
        return self(y1, y2), None

    def inverse(
        self, out: torch.Tensor, kept: Tuple[torch.Tensor, ...]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The streams from the output and what :meth:`forward_kept` returned beside it.

        Return each stream as a dense tensor in the memory format the blocks ran in (not, e.g.,
        a slice of one tensor): backward makes them the leaves whose gradients start the
        blocks' backward, and a leaf's gradient takes its layout only when it is dense.
        """
        raise NotImplementedError


def name_reversible_blocks(model: nn.Module, prefix: str = "") -> nn.Module:
    """Set every :class:`ReversibleBlock`'s ``qualified_name`` to its name in ``model``.

    Errors of the reversible backward then name the block as ``model.named_modules()`` does.
    Pass the model unwrapped (not its DistributedDataParallel wrapper), or a ``prefix``.

    Returns:
        ``model``.
    """
    for name, module in model.named_modules(prefix=prefix):
        if isinstance(module, ReversibleBlock):
            module.qualified_name = name
    return model


def describe_block(block: ReversibleBlock, index: int, count: int) -> str:
    """``block 3 of a 12-block sequence ('backbone.net.blocks.3', RevViTBlock)``: for errors.

    ``index`` counts from 0; the name is :attr:`ReversibleBlock.qualified_name`, when set.
    """
    name = f"{block.qualified_name!r}, " if block.qualified_name else ""
    return f"block {index} of a {count}-block sequence ({name}{type(block).__name__})"


class _RngState:
    """The CPU and CUDA generator states at one point of the forward, to replay later."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu = torch.get_rng_state()
        self.devices, self.cuda = get_device_states(*tensors)

    @contextlib.contextmanager
    def replay(self):
        """A context in which the generators are as captured; outside it they are untouched."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.cuda)
            yield


def _autocast_states() -> List[Tuple[str, bool, torch.dtype]]:
    states = []
    for device_type in ("cpu", "cuda"):
        if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
            enabled = torch.is_autocast_enabled(device_type)
            dtype = torch.get_autocast_dtype(device_type)
        elif device_type == "cpu":
            enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        else:
            enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        states.append((device_type, enabled, dtype))
    return states


@contextlib.contextmanager
def _replay_autocast(states):
    """Re-enter the autocast states recorded by :func:`_autocast_states`, with the weight-cast
    cache off (see the module docstring; casts give the same values either way)."""
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in states:
            stack.enter_context(
                torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)
            )
        yield


def _run_forward(blocks, x1, x2, inputs: Optional[list] = None):
    """Run ``blocks`` on (x1, x2), recording the generator state before each F and G.

    Appends each block's input to ``inputs`` if given. Returns the output streams and, per
    block, ``{"F": state, "G": state}``.
    """
    rng = []
    for block in blocks:
        if inputs is not None:
            inputs.append((x1, x2))
        rng_f = _RngState(x1, x2)
        x1 = _couple(x1, x2, block.F(x2), block, "F")
        rng_g = _RngState(x1, x2)
        x2 = _couple(x2, x1, block.G(x1), block, "G")
        rng.append({"F": rng_f, "G": rng_g})
    return x1, x2, rng


class _Step:
    """One step of the reversible backward: re-run F or G of one block (see the module doc).

    Args:
        index: the block's index in its sequence.
        block: the block.
        name: "F" or "G".
        source: the stream the function reads (0 or 1); it rebuilds the other one.
        rng: the generator state its forward run saw.
        params: the trainable parameters to accumulate gradients into.
    """

    def __init__(self, index, block, name, source, rng, params):
        self.index, self.block, self.name, self.source = index, block, name, source
        self.rng, self.params = rng, params
        self.leaf = self.out = None

    def rebuild(self, streams, build_graph: bool = True):
        """Re-run the function on ``streams[source]``; return the streams with the other rebuilt.

        With ``build_graph`` the re-run is recorded by autograd for :meth:`backprop`.
        """
        x = streams[self.source]
        with self.rng.replay(), torch.set_grad_enabled(build_graph):
            if build_graph:
                x = self.leaf = x.detach().requires_grad_(True)
            out = getattr(self.block, self.name)(x)
        if build_graph:
            self.out = out
        return _uncouple(self.block, streams, self.source, out.detach())

    def backprop(
        self, grad_rebuilt: torch.Tensor, grad_source: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pass the gradient of the stream this step rebuilds back through the coupling and the
        re-run function; return the gradients of the rebuilt stream and of the source.

        Parameter gradients are accumulated into ``.grad`` right here, step by step (through
        the usual AccumulateGrad, so hooks and DistributedDataParallel see them), rather than
        returned at the end of the whole backward: that would hold a second copy of every
        gradient at once.
        """
        # Under autocast F and G may return half precision while the streams are fp32.
        grad_out = grad_rebuilt.to(self.out.dtype)
        torch.autograd.backward(self.out, grad_out, inputs=[self.leaf, *self.params])
        grad_rebuilt, grad_source = self.block.coupling.grads(grad_rebuilt, grad_source)
        if self.leaf.grad is not None:
            grad_source = grad_source + self.leaf.grad
        self.leaf = self.out = None  # free this function's activations before the next step
        return grad_rebuilt, grad_source


def _steps(blocks, rng, trainable_ids) -> List[_Step]:
    """The backward's steps: the inverse steps of the last block, then of the one before..."""
    steps = []
    for index in reversed(range(len(blocks))):
        block = blocks[index]
        params = [p for p in block.parameters() if id(p) in trainable_ids]
        for name, source in INVERSE_STEPS:
            steps.append(_Step(index, block, name, source, rng[index][name], params))
    return steps


def _check_finite(finite: torch.Tensor, steps: Sequence[_Step], count: int):
    """Raise :class:`ReconstructionError` at the first non-finite flag (one host sync)."""
    if bool(finite.all()):
        return
    advice = (
        "What to do: lower the learning rate or clip gradients; check the input (images, "
        "normalisation) for non-finite or extreme values; train in float32 or bfloat16 rather "
        "than float16, whose range ends at 65504; or back-propagate with "
        'backprop="checkpoint" (the same model, with nothing rebuilt) to rule the '
        "reconstruction out."
    )
    flags = finite.tolist()
    if not flags[0]:
        raise ReconstructionError(
            f"The output of a reversible sequence of {count} blocks was not finite in forward, "
            "so its inputs cannot be rebuilt for backward: a value overflowed or the input was "
            f"not finite. {advice}"
        )
    step = steps[flags.index(False) - 1]
    formula = "X2 = Y2 - G(Y1)" if step.name == "G" else "X1 = Y1 - F(X2)"
    raise ReconstructionError(
        f"A non-finite value appeared in backward while rebuilding the input of "
        f"{describe_block(step.block, step.index, count)}: {step.name} re-run on the rebuilt "
        f"stream gave inf or nan ({formula}), although the sequence's output was finite. "
        f"{advice}"
    )


class _ReversibleFunction(torch.autograd.Function):
    """Runs reversible blocks keeping only the last output; rebuilds the rest in backward.

    With a :class:`SequenceOutput` it returns that output of the last streams and keeps it (and
    what the output needs to be inverted) instead of the streams.

    The gradients of ``params``, the blocks' (and the output's) trainable parameters, are
    accumulated into ``.grad`` step by step inside backward (see :meth:`_Step.backprop`). The
    parameters are not inputs of the Function: for an input given no gradient, autograd still
    runs its AccumulateGrad node and that node's hooks, so every parameter would be reported
    ready twice (DistributedDataParallel fails on that). ``anchor``, an empty tensor that
    requires grad, makes backward run even when the streams do not require grad (e.g. a frozen
    stem).
    """

    @staticmethod
    def forward(ctx, x1, x2, anchor, blocks, params, parallel_backward, output):
        ctx.blocks, ctx.output = blocks, output
        ctx.trainable_ids = {id(p) for p in params}
        ctx.parallel_backward = parallel_backward
        ctx.autocast = _autocast_states()
        with _replay_autocast(ctx.autocast):
            y1, y2, ctx.rng = _run_forward(blocks, x1, x2)  # grad is disabled in Function.forward
        if output is None:
            ctx.save_for_backward(y1, y2)
            return y1, y2
        out, kept = output.forward_kept(y1, y2)
        ctx.inverted = kept is not None
        ctx.save_for_backward(*((out, *kept) if ctx.inverted else (y1, y2)))
        return out

    @staticmethod
    def backward(ctx, *grads):
        with _replay_autocast(ctx.autocast):
            if ctx.output is None:
                (y1, y2), (dy1, dy2) = ctx.saved_tensors, grads
            else:
                y1, y2, dy1, dy2 = _output_backward(ctx, grads[0])
            steps = _steps(ctx.blocks, ctx.rng, ctx.trainable_ids)
            lanes, lookahead = schedule.select_lanes(y1.device, ctx.parallel_backward)
            (dx1, dx2), finite = schedule.run_backward(
                steps, (y1, y2), (dy1, dy2), lanes, lookahead
            )
        _check_finite(finite, steps, len(ctx.blocks))
        dx1 = dx1 if ctx.needs_input_grad[0] else None
        dx2 = dx2 if ctx.needs_input_grad[1] else None
        return dx1, dx2, None, None, None, None, None


def _output_backward(ctx, grad_out: torch.Tensor):
    """The last streams (from the kept output, or kept themselves) and their gradients, the
    output re-run under autograd on them and back-propagated (its parameters' gradients
    accumulated into ``.grad``, as the steps do)."""
    if ctx.inverted:
        out, *kept = ctx.saved_tensors
        with torch.no_grad():
            y1, y2 = ctx.output.inverse(out, tuple(kept))
    else:
        y1, y2 = ctx.saved_tensors
    y1, y2 = y1.detach().requires_grad_(True), y2.detach().requires_grad_(True)
    params = [p for p in ctx.output.parameters() if id(p) in ctx.trainable_ids]
    with torch.enable_grad():
        out = ctx.output(y1, y2)
    torch.autograd.backward(out, grad_out.to(out.dtype), inputs=[y1, y2, *params])
    grads = [torch.zeros_like(y) if y.grad is None else y.grad for y in (y1, y2)]
    return y1.detach(), y2.detach(), *grads


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # The streams are rebuilt by subtraction; in half precision that drifts (2e-2 relative
    # after 24 blocks in bf16), in fp32 it stays near rounding. F and G still run in the
    # caller's autocast dtype.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def reversible_sequence(
    blocks: Sequence[ReversibleBlock],
    x1: torch.Tensor,
    x2: torch.Tensor,
    backprop: str = "reversible",
    parallel_backward: bool = False,
    output: Optional[SequenceOutput] = None,
):
    """Run ``blocks`` on the two streams ``(x1, x2)`` and return the two output streams, or
    ``output`` of them.

    Args:
        blocks: reversible blocks, run in order.
        x1, x2: the two streams, of equal shape. Half-precision streams are upcast to fp32.
        backprop: "reversible", "autograd" or "checkpoint" (see the module docstring). The
            choice only matters when training with grad enabled; otherwise the blocks run as
            plain modules.
        parallel_backward: with "reversible" on CUDA, rebuild the next step's input on a
            second CUDA stream while the current step back-propagates (same gradients; the
            activations of two functions alive instead of one). Elsewhere the backward runs
            serially.
        output: one tensor made of the output streams (see :class:`SequenceOutput`); in
            "reversible" mode it is kept for backward instead of the streams.
    """
    check_backprop(backprop)
    x1, x2 = _upcast(x1), _upcast(x2)
    recompute = recomputes(backprop, any(b.training for b in blocks))
    if recompute and backprop == "reversible":
        blocks = tuple(blocks)
        check_invertible(blocks)
        for observe in REBUILT_SEQUENCE_OBSERVERS:
            observe(blocks, x1, x2)
        params = _unique_trainable_parameters([*blocks, *([] if output is None else [output])])
        anchor = x1.new_empty(0).requires_grad_(bool(params))
        return _ReversibleFunction.apply(x1, x2, anchor, blocks, params, parallel_backward, output)
    for block in blocks:
        if recompute:  # "checkpoint"
            x1, x2 = checkpoint(block, x1, x2, use_reentrant=False)
        else:
            x1, x2 = block(x1, x2)
    return (x1, x2) if output is None else output(x1, x2)


def check_invertible(blocks: Sequence[ReversibleBlock]) -> None:
    """Raise if a block's coupling cannot be undone (a scaled coupling with ``beta == 0``).

    One device-to-host copy for all scaled couplings of the sequence; none for additive ones.
    """
    scaled = [(i, b) for i, b in enumerate(blocks) if b.coupling.skip_scale() is not None]
    if not scaled:
        return
    scales = torch.stack([b.coupling.skip_scale().float() for _, b in scaled]).tolist()
    for (index, block), beta in zip(scaled, scales):
        if beta == 0:
            raise ValueError(
                f"{describe_block(block, index, len(blocks))} has beta = 0: its coupling "
                "Y = beta * X + alpha * R + f(R) drops X, so X cannot be rebuilt and "
                'backprop="reversible" cannot run. Back-propagate with "checkpoint" (exact at any '
                "beta) until the coupling schedule has raised beta (MODEL.REV.COUPLING; "
                "docs/vitdet_surrogate.md), or start the schedule at a beta above 0."
            )


def _unique_trainable_parameters(parts: Sequence) -> List[nn.Parameter]:
    seen, params = set(), []
    for part in parts:
        for p in part.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class ReversibleSequence(nn.ModuleList, BackpropModule):
    """A list of :class:`ReversibleBlock` run by :func:`reversible_sequence`.

    It is an ``nn.ModuleList``, so its blocks are named ``{i}.<sub-module>`` exactly as in a
    plain transformer's ``blocks`` list, and checkpoints load by name.

    Args:
        blocks: the reversible blocks.
        backprop: "reversible" (default), "autograd" or "checkpoint".
        parallel_backward: overlap rebuilding and back-propagation on two CUDA streams (see
            :func:`reversible_sequence`).
    """

    def __init__(
        self,
        blocks: Sequence[ReversibleBlock],
        backprop: str = "reversible",
        parallel_backward: bool = False,
    ):
        super().__init__(blocks)
        for i, block in enumerate(self):
            if not isinstance(block, ReversibleBlock):
                raise TypeError(
                    f"block {i} is a {type(block).__name__}, not a ReversibleBlock: a reversible "
                    "sequence needs blocks that expose F and G (subclass ReversibleBlock)."
                )
        self.backprop = backprop
        self.parallel_backward = parallel_backward

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return reversible_sequence(list(self), x1, x2, self.backprop, self.parallel_backward)

    def extra_repr(self) -> str:
        return f"backprop={self.backprop!r}, parallel_backward={self.parallel_backward}"
