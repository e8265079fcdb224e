"""How far the reversible backward's rebuilt inputs drift from the true ones.

In exact arithmetic a reversible block's inverse gives back its input; in floating point the
subtraction ``X2 = Y2 - G(Y1)`` loses what rounding put into ``Y2``, and the error grows with
depth and shrinks with precision (fp32 ~1e-6 after 48 blocks, bf16 ~1e-2).
:func:`measure_reconstruction` measures it with the backward's own steps;
:func:`record_sequence_inputs` keeps what the sequences of a training step ran on, to measure it
during training (``rev_det.training.ReconstructionCheck``).

This module depends on torch only.
"""

import contextlib
from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch.utils.checkpoint import get_device_states

from . import engine
from .engine import (
    INVERSE_STEPS,
    ReversibleBlock,
    _autocast_states,
    _replay_autocast,
    _run_forward,
    _steps,
    _upcast,
)

__all__ = ["SequenceInput", "measure_reconstruction", "record_sequence_inputs"]


@torch.no_grad()
def measure_reconstruction(
    blocks: Sequence[ReversibleBlock], x1: torch.Tensor, x2: torch.Tensor
) -> torch.Tensor:
    """How far the reversible backward's rebuilt block inputs drift from the true ones.

    Runs ``blocks`` forward from (x1, x2) keeping every block's input, then rebuilds the inputs
    from the output by the backward's own steps (the engine's ``_Step``, same random draws), without
    gradients. Runs under the caller's autocast; the global generators are left untouched.

    Returns:
        A float tensor of shape ``(len(blocks), 2)``: per block, the max and the mean relative
        error of its rebuilt input over both streams, ``max |X' - X| / max |X|`` and
        ``mean |X' - X| / mean |X|``. Row 0, the first block, has gone through every inversion.
    """
    x1, x2 = _upcast(x1), _upcast(x2)
    devices, _ = get_device_states(x1, x2)
    with torch.random.fork_rng(devices=devices):
        inputs = []
        y1, y2, rng = _run_forward(blocks, x1, x2, inputs)
    streams, errors = (y1, y2), []
    for step in _steps(blocks, rng, trainable_ids=set()):
        streams = step.rebuild(streams, build_graph=False)
        if step.name == INVERSE_STEPS[-1][0]:  # the block's last step: its input is rebuilt
            errors.append(_relative_errors(streams, inputs[step.index]))
    return torch.stack(errors[::-1])


def _relative_errors(rebuilt, true) -> torch.Tensor:
    diff = [(a - b).abs() for a, b in zip(rebuilt, true)]
    size = [b.abs() for b in true]
    tiny = torch.finfo(size[0].dtype).tiny
    max_err = torch.maximum(*(d.max() for d in diff)) / torch.maximum(*(s.max() for s in size))
    mean_err = sum(d.sum() for d in diff) / sum(s.sum() for s in size).clamp_min(tiny)
    return torch.stack([max_err, mean_err]).float()


class SequenceInput(NamedTuple):
    """What one reversible sequence ran on: its blocks, its input streams, the autocast state."""

    blocks: Tuple[ReversibleBlock, ...]
    x1: torch.Tensor
    x2: torch.Tensor
    autocast: list

    def measure(self) -> torch.Tensor:
        """:func:`measure_reconstruction` on this input, in the autocast state it ran in."""
        with _replay_autocast(self.autocast):
            return measure_reconstruction(self.blocks, self.x1, self.x2)


@contextlib.contextmanager
def record_sequence_inputs():
    """Record the input of every reversible sequence that runs inside this context.

    Only sequences that back-propagate with ``backprop="reversible"`` in training (those whose
    inputs are rebuilt) are recorded, each once (a sequence re-run by a checkpoint is the same
    sequence). The inputs are kept detached until the context's list is dropped.

    Yields:
        The list of :class:`SequenceInput`, filled as sequences run.
    """
    records: List[SequenceInput] = []

    def record(blocks: Tuple[ReversibleBlock, ...], x1: torch.Tensor, x2: torch.Tensor):
        if not any(r.blocks == blocks for r in records):
            records.append(SequenceInput(blocks, x1.detach(), x2.detach(), _autocast_states()))

    engine.REBUILT_SEQUENCE_OBSERVERS.append(record)
    try:
        yield records
    finally:
        engine.REBUILT_SEQUENCE_OBSERVERS.remove(record)
