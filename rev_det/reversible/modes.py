"""The backprop modes, and the contract of a module that follows one.

Every part of rev_det that can trade memory for compute (a reversible sequence, a trunk, a
pyramid) has a ``backprop`` mode:

========== =============================================== ===============================
mode       between forward and backward                    backward
========== =============================================== ===============================
autograd   every activation (the baseline)                 autograd
checkpoint each unit's input (``torch.utils.checkpoint``)  re-run the unit, then autograd
reversible a sequence's outputs only                       rebuild inputs from outputs
========== =============================================== ===============================

All three give the same gradients. :class:`BackpropModule` names the contract: a checked
``backprop`` property, and :meth:`BackpropModule.recomputes` (:func:`recomputes`, the one rule
for when a mode other than autograd changes anything: training, with grad enabled).
:class:`TrunkModeModule` is one that follows its trunk's mode unless given its own (the
pyramids). :func:`set_backprop` and the DDP guard find these modules by type.
:func:`run_recomputed` runs a non-invertible part (a transition, a pyramid level, an FPN) as
one recomputed unit when that rule says so.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "BACKPROP_MODES",
    "BackpropModule",
    "TrunkModeModule",
    "check_backprop",
    "recomputes",
    "run_recomputed",
    "set_backprop",
]

BACKPROP_MODES = ("reversible", "autograd", "checkpoint")


def check_backprop(mode: str, key: str = "backprop") -> str:
    """Return ``mode`` if it is a backprop mode; otherwise raise naming ``key`` (an argument or
    a config key such as ``MODEL.REV.BACKPROP``) and the valid modes."""
    if mode not in BACKPROP_MODES:
        raise ValueError(f"{key} = {mode!r} is not valid; choose one of {BACKPROP_MODES}.")
    return mode


def recomputes(mode: str, training: bool) -> bool:
    """Whether a part in ``mode`` should store less than autograd would: a mode other than
    "autograd", in training, with grad enabled (otherwise nothing is kept for backward)."""
    return mode != "autograd" and training and torch.is_grad_enabled()


class BackpropModule(nn.Module):
    """A module whose backward follows a backprop mode (see the module docstring).

    Subclasses set ``self.backprop`` in their constructor (checked on every assignment); one
    that follows another module's mode overrides the property.
    """

    @property
    def backprop(self) -> str:
        return self._backprop

    @backprop.setter
    def backprop(self, mode: str):
        self._backprop = check_backprop(mode)

    def recomputes(self) -> bool:
        """Whether this forward should store less than autograd would (:func:`recomputes`)."""
        return recomputes(self.backprop, self.training)


class TrunkModeModule(BackpropModule):
    """A module on a trunk (``self.net``) whose mode is the trunk's unless it is given its own
    (setting None follows the trunk again)."""

    _backprop = None

    @property
    def backprop(self) -> str:
        return self._backprop or self.net.backprop

    @backprop.setter
    def backprop(self, mode):
        self._backprop = None if mode is None else check_backprop(mode)


def set_backprop(model: nn.Module, mode: str) -> nn.Module:
    """Switch every reversible part of ``model`` (trunks and pyramids) to backprop ``mode``.

    The parameters stay the same, so one model can be measured in all three modes.
    """
    check_backprop(mode)
    for module in model.modules():
        if isinstance(module, BackpropModule):
            module.backprop = mode
    return model


def run_recomputed(recompute: bool, fn, *args):
    """``fn(*args)``; with ``recompute`` as one recomputed unit
    (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant): only its inputs are kept for
    backward, where it runs again. ``recompute`` is usually :meth:`BackpropModule.recomputes`."""
    if recompute:
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
