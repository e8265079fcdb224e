"""Reversible backpropagation for two-stream residual networks.

A reversible block holds two streams and updates them with additive couplings::

    Y1 = X1 + F(X2)
    Y2 = X2 + G(Y1)

and its input can be rebuilt from its output::

    X2 = Y2 - G(Y1)
    X1 = Y1 - F(X2)

So a sequence of such blocks needs to keep only its last output for backward. Walking the
blocks in reverse, each block's input is rebuilt, F and G are re-run under autograd, and the
gradients flow one block at a time: activation memory is O(1) in depth instead of O(depth),
for the price of one extra forward of F and G per block.

Three ways to back-propagate through the same blocks (same parameters, outputs and
gradients; only memory and time differ) are selected by ``backprop``:

* ``"reversible"``: :class:`_ReversibleFunction`, which stores only the sequence's output;
* ``"autograd"``: ordinary autograd, every activation stored;
* ``"checkpoint"``: :func:`torch.utils.checkpoint.checkpoint` around each block, which stores
  each block's input.

Recomputation replays the forward exactly: the CPU and CUDA random number generator states
seen by F and G in forward are restored around their re-runs (dropout and drop path draw the
same masks), and so is the forward's autocast state. The global generators are left as they
would be after ordinary autograd. In eval mode or without grad no custom Function is used.

This module depends on torch only.
"""

import contextlib
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, get_device_states, set_device_states

__all__ = ["BACKPROP_MODES", "ReversibleBlock", "ReversibleSequence", "reversible_sequence"]

BACKPROP_MODES = ("reversible", "autograd", "checkpoint")


class ReversibleBlock(nn.Module):
    """A two-stream block with additive couplings ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``.

    Subclasses define :meth:`F` and :meth:`G`. Both must return a tensor of the shape of their
    input, and must be deterministic given the random number generator state (dropout and drop
    path are fine: the engine replays the generator state in recomputation).
    """

    def F(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the paper's name)
        raise NotImplementedError

    def G(self, x: torch.Tensor) -> torch.Tensor:  # noqa: N802 (the paper's name)
        raise NotImplementedError

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y1 = _couple(x1, self.F(x2), self, "F")
        y2 = _couple(x2, self.G(y1), self, "G")
        return y1, y2


def _couple(x: torch.Tensor, fx: torch.Tensor, block: nn.Module, name: str) -> torch.Tensor:
    # A shape change would broadcast silently or fail deep inside autograd; say why instead.
    if fx.shape != x.shape:
        raise ValueError(
            f"{type(block).__name__}.{name} maps a tensor of shape {tuple(x.shape)} to "
            f"{tuple(fx.shape)}; a reversible block's F and G must preserve shape. Run blocks "
            "that change shape (e.g. stage transitions) outside the reversible sequence."
        )
    return x + fx


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
    """Re-enter the autocast states recorded by :func:`_autocast_states`."""
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in states:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


def _recompute_backward(fn, x, params, grad_out):
    """Re-run ``fn(x)`` under autograd and back-propagate ``grad_out`` through it.

    Parameter gradients are accumulated into ``.grad`` right here, block by block (through the
    usual AccumulateGrad, so hooks and DistributedDataParallel see them), rather than returned
    at the end of the whole backward: that would hold a second copy of every gradient at once.

    Returns:
        The output (detached) and the gradient with respect to ``x``.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        # Under autocast F and G may return half precision while the streams are fp32.
        torch.autograd.backward(out, grad_out.to(out.dtype), inputs=[x, *params])
    return out.detach(), x.grad


class _ReversibleFunction(torch.autograd.Function):
    """Runs reversible blocks keeping only the last output; rebuilds the rest in backward.

    ``params`` are the blocks' trainable parameters. They are inputs only so that backward runs
    even when the streams do not require grad; their gradients are accumulated block by block
    inside backward (see :func:`_recompute_backward`), so None is returned for them.
    """

    @staticmethod
    def forward(ctx, x1, x2, blocks, *params):
        ctx.blocks = blocks
        ctx.params = params
        ctx.autocast = _autocast_states()
        ctx.rng = []
        for block in blocks:  # grad is disabled inside Function.forward
            rng_f = _RngState(x1, x2)
            x1 = _couple(x1, block.F(x2), block, "F")
            rng_g = _RngState(x1, x2)
            x2 = _couple(x2, block.G(x1), block, "G")
            ctx.rng.append((rng_f, rng_g))
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        trainable = {id(p) for p in ctx.params}
        with _replay_autocast(ctx.autocast):
            for block, (rng_f, rng_g) in zip(reversed(ctx.blocks), reversed(ctx.rng)):
                params = [p for p in block.parameters() if id(p) in trainable]
                # Y2 = X2 + G(Y1): rebuild X2, and pass dY2 through G into dY1.
                with rng_g.replay():
                    g, dy1_g = _recompute_backward(block.G, y1, params, dy2)
                y2 = y2 - g  # now X2
                dy1 = dy1 + dy1_g
                del g, dy1_g  # free before F is re-run: one block's working set at a time
                # Y1 = X1 + F(X2): rebuild X1, and pass dY1 through F into dX2.
                with rng_f.replay():
                    f, dx2_f = _recompute_backward(block.F, y2, params, dy1)
                y1 = y1 - f  # now X1
                dy2 = dy2 + dx2_f
                del f, dx2_f
        dx1 = dy1 if ctx.needs_input_grad[0] else None
        dx2 = dy2 if ctx.needs_input_grad[1] else None
        return (dx1, dx2, None) + (None,) * len(ctx.params)


def _check_backprop(backprop: str) -> str:
    if backprop not in BACKPROP_MODES:
        raise ValueError(f"Unknown backprop mode {backprop!r}; valid modes: {BACKPROP_MODES}.")
    return backprop


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run ``blocks`` on the two streams ``(x1, x2)`` and return the two output streams.

    Args:
        blocks: reversible blocks, run in order.
        x1, x2: the two streams, of equal shape. Half-precision streams are upcast to fp32.
        backprop: "reversible", "autograd" or "checkpoint" (see the module docstring). The
            choice only matters when training with grad enabled; otherwise the blocks run as
            plain modules.
    """
    _check_backprop(backprop)
    x1, x2 = _upcast(x1), _upcast(x2)
    training = torch.is_grad_enabled() and any(b.training for b in blocks)
    if not training or backprop == "autograd":
        for block in blocks:
            x1, x2 = block(x1, x2)
        return x1, x2
    if backprop == "checkpoint":
        for block in blocks:
            x1, x2 = checkpoint(block, x1, x2, use_reentrant=False)
        return x1, x2
    params = _unique_trainable_parameters(blocks)
    return _ReversibleFunction.apply(x1, x2, list(blocks), *params)


def _unique_trainable_parameters(blocks: Sequence[nn.Module]) -> List[nn.Parameter]:
    seen, params = set(), []
    for block in blocks:
        for p in block.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


class ReversibleSequence(nn.ModuleList):
    """A list of :class:`ReversibleBlock` run by :func:`reversible_sequence`.

    It is an ``nn.ModuleList``, so its blocks are named ``{i}.<sub-module>`` exactly as in a
    plain transformer's ``blocks`` list, and checkpoints load by name.

    Args:
        blocks: the reversible blocks.
        backprop: "reversible" (default), "autograd" or "checkpoint".
    """

    def __init__(self, blocks: Sequence[ReversibleBlock], backprop: str = "reversible"):
        super().__init__(blocks)
        for i, block in enumerate(self):
            if not isinstance(block, ReversibleBlock):
                raise TypeError(
                    f"block {i} is a {type(block).__name__}, not a ReversibleBlock: a reversible "
                    "sequence needs blocks that expose F and G (subclass ReversibleBlock)."
                )
        self.backprop = _check_backprop(backprop)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return reversible_sequence(list(self), x1, x2, self.backprop)

    def extra_repr(self) -> str:
        return f"backprop={self.backprop!r}"
