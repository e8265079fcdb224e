"""The reversible backpropagation engine (torch only; knows nothing of images or Detectron2).

* :mod:`.engine`: reversible blocks and sequences, the three backprop modes;
* :mod:`.schedule`: the order of the reversible backward's steps, serial or on two CUDA streams;
* :mod:`.drift`: how far rebuilt inputs drift from the true ones.
"""

from .drift import SequenceInput, measure_reconstruction, record_sequence_inputs
from .engine import (
    BACKPROP_MODES,
    ReconstructionError,
    ReversibleBlock,
    ReversibleSequence,
    describe_block,
    name_reversible_blocks,
    reversible_sequence,
)

__all__ = [
    "BACKPROP_MODES",
    "ReconstructionError",
    "ReversibleBlock",
    "ReversibleSequence",
    "SequenceInput",
    "describe_block",
    "measure_reconstruction",
    "name_reversible_blocks",
    "record_sequence_inputs",
    "reversible_sequence",
]
