"""The reversible backpropagation engine (torch only; knows nothing of images or Detectron2)."""

from .engine import (
    BACKPROP_MODES,
    ReconstructionError,
    ReversibleBlock,
    ReversibleSequence,
    SequenceInput,
    describe_block,
    measure_reconstruction,
    name_reversible_blocks,
    record_sequence_inputs,
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
