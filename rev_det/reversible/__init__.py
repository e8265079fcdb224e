"""The reversible backpropagation engine (torch only; knows nothing of images or Detectron2).

* :mod:`.modes`: the three backprop modes and :class:`BackpropModule`, the contract of a module
  that follows one;
* :mod:`.engine`: reversible blocks, their couplings (additive or scaled) and sequences;
* :mod:`.branches`: several outputs sharing their first part, as one recomputed unit;
* :mod:`.schedule`: the order of the reversible backward's steps, serial or on two CUDA streams;
* :mod:`.drift`: how far rebuilt inputs drift from the true ones.
"""

from .branches import recomputed_branches
from .drift import SequenceInput, measure_reconstruction, record_sequence_inputs
from .engine import (
    ADDITIVE,
    Coupling,
    ReconstructionError,
    ReversibleBlock,
    ReversibleSequence,
    ScaledCoupling,
    SequenceOutput,
    check_invertible,
    describe_block,
    name_reversible_blocks,
    reversible_sequence,
)
from .modes import (
    BACKPROP_MODES,
    BackpropModule,
    TrunkModeModule,
    check_backprop,
    recomputes,
    run_recomputed,
    set_backprop,
)

__all__ = [
    "ADDITIVE",
    "BACKPROP_MODES",
    "Coupling",
    "BackpropModule",
    "TrunkModeModule",
    "ReconstructionError",
    "ReversibleBlock",
    "ReversibleSequence",
    "ScaledCoupling",
    "SequenceInput",
    "SequenceOutput",
    "check_backprop",
    "check_invertible",
    "describe_block",
    "measure_reconstruction",
    "name_reversible_blocks",
    "record_sequence_inputs",
    "recomputed_branches",
    "reversible_sequence",
    "recomputes",
    "run_recomputed",
    "set_backprop",
]
