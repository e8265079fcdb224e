"""The schedule of the reversible backward: the steps in order, on one or two CUDA streams.

:func:`run_backward` takes the steps of :mod:`rev_det.reversible.engine` (each rebuilds one
stream and back-propagates through the function that rebuilt it) and runs them on two *lanes*.
On CPU, and whenever ``parallel_backward`` is off, both lanes are the same serial lane and the
schedule is the textbook loop: rebuild step k, back-propagate step k, go on to k + 1. On CUDA
with ``parallel_backward`` the lanes are two streams and rebuilding step k + 1 overlaps
back-propagating step k (PaReprop). The schedule is written once, against :class:`Lane`.

This module depends on torch only.
"""

import collections
import contextlib
import functools
import logging
from typing import NamedTuple, Sequence, Tuple

import torch

__all__ = ["Lane", "CudaLane", "SERIAL", "select_lanes", "run_backward"]

logger = logging.getLogger(__name__)


class Lane:
    """Where steps of the backward run: here, in order on the current stream (CPU, or serial).

    :class:`CudaLane` runs them on a CUDA stream. The scheduling in :func:`run_backward` is
    written once against this interface; on a ``Lane`` its synchronisation does nothing.
    """

    def run(self):
        """A context in which work is enqueued on this lane."""
        return contextlib.nullcontext()

    def mark(self):
        """An event marking the work enqueued on this lane so far."""
        return None

    def wait(self, event):
        """Make later work on this lane wait for ``event`` (of another lane)."""

    def wait_all(self, other: "Lane"):
        """Make later work on this lane wait for all work enqueued on ``other`` so far."""

    def receive(self, tensor: torch.Tensor):
        """Tell the allocator that this lane uses ``tensor``, made on another lane."""


class CudaLane(Lane):
    def __init__(self, stream: torch.cuda.Stream):
        self.stream = stream

    def run(self):
        return torch.cuda.stream(self.stream)

    def mark(self):
        return self.stream.record_event()

    def wait(self, event):
        self.stream.wait_event(event)

    def wait_all(self, other: "CudaLane"):
        self.stream.wait_stream(other.stream)

    def receive(self, tensor: torch.Tensor):
        # The caching allocator reuses a freed tensor's memory for the next allocation on the
        # stream that made it, with no regard for other streams that may still be reading it.
        # record_stream delays that reuse until this stream's work enqueued so far is done.
        tensor.record_stream(self.stream)


SERIAL = Lane()


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@functools.lru_cache(maxsize=None)
def _log_serial_fallback(device_type: str):
    logger.info(
        "parallel_backward needs CUDA streams; on %s the reversible backward runs serially "
        "(same gradients).",
        device_type,
    )


def select_lanes(device: torch.device, parallel: bool) -> Tuple[Tuple[Lane, Lane], int]:
    """The two lanes of the backward and how many steps the rebuilding runs ahead (0 or 1)."""
    if parallel and device.type == "cuda":
        main = CudaLane(torch.cuda.current_stream(device))
        return (main, CudaLane(_side_stream(device))), 1
    if parallel:
        _log_serial_fallback(device.type)
    return (SERIAL, SERIAL), 0


class _Handle(NamedTuple):
    """A tensor passed between steps, with the lane that made it and an event marking when."""

    tensor: torch.Tensor
    lane: Lane
    ready: object


def _take(handle: _Handle, lane: Lane) -> torch.Tensor:
    """``handle``'s tensor, safe to use on ``lane``."""
    if handle.lane is not lane:
        lane.wait(handle.ready)  # its maker has finished writing it
        lane.receive(handle.tensor)  # and its memory is not reused while this lane reads it
    return handle.tensor


def _finite(x: torch.Tensor) -> torch.Tensor:
    """Whether every element of ``x`` is finite, as a 0-dim bool tensor (no host sync).

    One pass over ``x``: its sum is inf or nan when an element is (``isfinite(x).all()`` takes
    four). The sum also overflows when the elements come within a factor ``x.numel()`` of the
    largest float32 (or float64) value; such a stream counts as overflowed, which it is for
    the norms of the next block.
    """
    return torch.isfinite(x.sum(dtype=torch.promote_types(x.dtype, torch.float32)))


def run_backward(steps: Sequence, streams, grads, lanes, lookahead: int):
    """Run the backward's steps; return the gradients of the input streams and finiteness flags.

    Each step has ``source`` (the stream its function reads), ``rebuild(streams)`` (returns the
    streams with the other one rebuilt) and ``backprop(grad_rebuilt, grad_source)`` (returns
    both streams' gradients at the step's input); see ``rev_det.reversible.engine._Step``. The
    flags are one boolean per rebuilt stream, after one for the output streams.

    Step k runs on lane ``k % 2``, rebuilding and then back-propagating. Rebuilding step k + 1
    needs nothing from step k's back-propagation, so on two CUDA streams the two can run at
    the same time::

        lane 0:  rebuild 0 | backprop 0 | rebuild 2 | backprop 2 | ...
        lane 1:              rebuild 1  | backprop 1 | rebuild 3 | ...

    With ``lookahead`` 1 the host also enqueues step k + 1's rebuild before step k's
    back-propagation, so that the rebuild can start at once.

    The data dependencies, and how they are kept across lanes:

    * rebuild k reads the stream rebuilt by step k - 1 (the other lane) and, with autograd,
      builds the graph that backprop k runs on lane k % 2 too: autograd runs backward kernels on
      the stream of their forward kernels, which is why steps alternate lanes rather than one
      lane rebuilding and the other back-propagating;
    * backprop k reads the gradients made by backprop k - 1 (the other lane);
    * the parameters, written by the optimizer, and the saved outputs and incoming gradients
      come from the main lane (lane 0, the stream autograd called this backward on), which
      lane 1 waits for first; the main lane waits for all of lane 1 at the end, parameter
      gradients included.

    Every tensor passed between steps travels in a :class:`_Handle`: a step on another lane
    waits for the event marking it made (``wait``) and tells the allocator it uses it
    (``receive``), so it is neither read early nor reused early. Everything else a step makes
    (its output, its autograd graph, its gradients) stays on its lane. On CPU and on the serial
    path both lanes are one ``Lane`` and all of this does nothing.
    """
    main, side = lanes
    side.wait_all(main)  # whatever ran before this backward (the optimizer step, the forward)
    ready = main.mark()
    streams = [_Handle(s, main, ready) for s in streams]
    grads = [_Handle(g, main, ready) for g in grads]
    finite = [_finite(streams[0].tensor) & _finite(streams[1].tensor)]
    pending = collections.deque()

    def backprop(k: int):
        step, lane = steps[k], lanes[k % 2]
        target = 1 - step.source
        with lane.run():
            grad_target, grad_source = step.backprop(
                _take(grads[target], lane), _take(grads[step.source], lane)
            )
            ready = lane.mark()
            grads[target] = _Handle(grad_target, lane, ready)
            grads[step.source] = _Handle(grad_source, lane, ready)

    for k, step in enumerate(steps):
        lane = lanes[k % 2]
        with lane.run():
            rebuilt = step.rebuild((_take(streams[0], lane), _take(streams[1], lane)))
            target = 1 - step.source
            streams[target] = _Handle(rebuilt[target], lane, lane.mark())
            finite.append(_finite(rebuilt[target]))
        pending.append(k)
        if len(pending) > lookahead:
            backprop(pending.popleft())
    while pending:
        backprop(pending.popleft())

    dx = [_take(g, main) for g in grads]
    main.wait_all(side)
    return dx, torch.stack(finite)
