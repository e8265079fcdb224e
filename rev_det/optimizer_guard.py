"""No silent SGD: the first step of an optimizer that is not the configured one stops training.

Detectron2's stock ``DefaultTrainer`` builds SGD whatever ``SOLVER.OPTIMIZER`` says, so a
project that names rev_det's backbones in its yacs config but keeps the stock trainer would
train its AdamW recipe with SGD without a word. The backbone builders therefore call
:func:`expect_optimizer`; a global optimizer step pre-hook (the only way to see a trainer rev_det
does not control) checks each optimizer once, at its first step, and raises if it updates those
parameters and is not of the configured class. Wrappers that hold the configured optimizer
(``ZeroRedundancyOptimizer(optimizer_class=AdamW)``, Lookahead-style wrappers with an
``optimizer`` or ``optim`` attribute) pass. ``SOLVER.CHECK_OPTIMIZER False`` turns the check off.

This module depends on torch only (the builders call it; it knows nothing of the models).
"""

import weakref
from typing import Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["expect_optimizer", "OPTIMIZERS"]

# SOLVER.OPTIMIZER -> the optimizer class rev_det.solver.build_optimizer returns (or a subclass:
# gradient clipping subclasses it).
OPTIMIZERS = {"SGD": torch.optim.SGD, "ADAMW": torch.optim.AdamW}
# Modules whose config asked for an optimizer other than Detectron2's default (SGD), and the
# optimizers already found right; weak, so that neither keeps a model or an optimizer alive.
_EXPECTED: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_CHECKED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
_hook_handle = None


def expect_optimizer(module: nn.Module, name: str) -> nn.Module:
    """Require ``module``'s parameters to be trained by the optimizer ``name``.

    ``name`` is ``SOLVER.OPTIMIZER`` ("SGD" or "ADAMW"). For "ADAMW", the first ``step()`` of an
    optimizer that updates parameters of ``module`` and neither is nor holds an AdamW raises a
    RuntimeError naming the fix. "SGD" is what Detectron2 builds by default, so nothing is
    checked then. Each optimizer is checked once.

    Args:
        module: the module (a backbone built from a yacs config).
        name: the configured optimizer, case-insensitive.

    Returns:
        ``module``.
    """
    global _hook_handle
    name = name.upper()
    if name not in OPTIMIZERS:
        raise ValueError(
            f"SOLVER.OPTIMIZER = {name!r} is not valid; choose one of {tuple(OPTIMIZERS)}."
        )
    if name == "SGD":
        return module
    _EXPECTED[module] = name
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_check_step)
    return module


def _optimizer_classes(optimizer) -> Iterator[type]:
    """The classes ``optimizer`` is or wraps: its own, ZeroRedundancyOptimizer's
    ``optimizer_class``, and those of an optimizer it holds as ``optimizer`` or ``optim``."""
    yield type(optimizer)
    constructor = getattr(optimizer, "_optim_constructor", None)  # ZeroRedundancyOptimizer
    if isinstance(constructor, type):
        yield constructor
    for attribute in ("optimizer", "optim"):
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            yield from _optimizer_classes(inner)


def _check_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: raise if ``optimizer`` is not the one configured."""
    if optimizer in _CHECKED:
        return
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    classes = list(_optimizer_classes(optimizer))
    for module, name in list(_EXPECTED.items()):
        if any(issubclass(c, OPTIMIZERS[name]) for c in classes):
            continue
        if any(id(p) in params for p in module.parameters()):
            raise RuntimeError(
                f"SOLVER.OPTIMIZER is {name!r}, but the model is being trained by "
                f"{type(optimizer).__name__}: Detectron2's stock DefaultTrainer builds SGD "
                "whatever SOLVER.OPTIMIZER says. Give your trainer rev_det's builder: "
                "`@classmethod def build_optimizer(cls, cfg, model): return "
                "rev_det.solver.build_optimizer(cfg, model)` (docs/projects.md, 'Detectron2 "
                'versions\'); or set SOLVER.OPTIMIZER "SGD" to train with SGD; or, if this '
                "optimizer is what you mean, SOLVER.CHECK_OPTIMIZER False to skip this check."
            )
    _CHECKED.add(optimizer)
