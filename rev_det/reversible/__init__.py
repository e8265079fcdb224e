"""The reversible backpropagation engine (torch only; knows nothing of images or Detectron2)."""

from .engine import BACKPROP_MODES, ReversibleBlock, ReversibleSequence, reversible_sequence

__all__ = ["BACKPROP_MODES", "ReversibleBlock", "ReversibleSequence", "reversible_sequence"]
