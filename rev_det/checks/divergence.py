"""Advice when training diverges.

:func:`divergence_advice` re-raises a non-finite loss or box of training with the iteration
and what to change (learning rate, warm-up, gradient clipping, precision).
"""

import contextlib
from typing import Optional

from .names import YACS, SettingNames

__all__ = [
    "divergence_advice",
]


@contextlib.contextmanager
def divergence_advice(trainer, names: SettingNames = YACS, lr: Optional[float] = None):
    """Re-raise a FloatingPointError of training (a non-finite loss, Detectron2's "Training has
    diverged" on non-finite boxes) with the iteration and what to change. The reconstruction
    check's errors carry their own advice and pass unchanged."""
    from ..reversible import ReconstructionError

    try:
        yield
    except ReconstructionError:
        raise
    except FloatingPointError as e:
        at = f" ({names.base_lr} = {lr:g})" if lr is not None else ""
        raise FloatingPointError(
            f"Training diverged at iteration {trainer.iter}: {e}\nThe loss or the predicted "
            f"boxes became infinite or NaN, most often because the learning rate is too high "
            f"for the batch{at}. What to do: lower {names.base_lr} (e.g. 10x; scale it with "
            f"the total batch size), lengthen the warm-up ({names.warmup}), or clip gradients "
            "(yacs: SOLVER.CLIP_GRADIENTS.ENABLED); with float16 AMP, try bfloat16 or float32. "
            "If it diverges even so, check the data for broken boxes."
        ) from e
