"""Checks that a DistributedDataParallel model can train its reversible parts.

DDP reduces each parameter's gradient when the autograd hook of that parameter fires. With
``find_unused_parameters=True`` it also walks the autograd graph after every forward to find
the parameters that took no part in it, and marks those ready for reduction at once. The
parameters of reversible blocks are not in that graph: the reversible Function
(:mod:`rev_det.reversible.engine`) keeps no graph of its blocks in forward and computes their
gradients inside its own backward, by re-running F and G block by block. So DDP takes every one
of them for unused, marks it ready right after forward, and fails when its gradient arrives in
backward ("... has been marked as ready twice"). Detectron2 builds DDP with
``find_unused_parameters=False``, which is what reversible training needs;
``backprop="checkpoint"`` (non-reentrant) and ``"autograd"`` keep the real graph and work with
either setting.

This module depends on torch only.
"""

from typing import List

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .engine import ReversibleBlock
from .modes import BackpropModule

__all__ = ["check_ddp_model", "reversible_owners"]


def reversible_owners(model: nn.Module) -> List[str]:
    """Names of the modules of ``model`` that back-propagate through the reversible Function.

    A module runs reversible blocks with the mode of its nearest enclosing
    :class:`BackpropModule` (a :class:`ReversibleSequence`, RevViT, RevMViT, a reversible
    pyramid); this returns the names of those owners whose mode is ``"reversible"`` and that own
    at least one :class:`ReversibleBlock` ("" for ``model`` itself).
    """
    owners = []

    def visit(module: nn.Module, name: str, owner: str, mode: str):
        if isinstance(module, BackpropModule):
            owner, mode = name, module.backprop
        if isinstance(module, ReversibleBlock) and mode == "reversible" and owner not in owners:
            owners.append(owner)
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name, owner, mode)

    visit(model, "", "", None)
    return owners


def check_ddp_model(model: nn.Module) -> nn.Module:
    """Raise if ``model`` is a DDP model that cannot back-propagate through its reversible parts.

    Call it once after wrapping the model in DistributedDataParallel (Detectron2's
    ``create_ddp_model``), before training. A model that is not wrapped passes.

    Returns:
        ``model``, unchanged.

    Raises:
        ValueError: the model was wrapped with ``find_unused_parameters=True`` and has modules
            with ``backprop="reversible"`` (see the module docstring for why that fails), naming
            those modules.
    """
    if not isinstance(model, DistributedDataParallel) or not model.find_unused_parameters:
        return model
    owners = reversible_owners(model.module)
    if owners:
        names = ", ".join(repr(o) for o in owners)
        raise ValueError(
            "DistributedDataParallel(find_unused_parameters=True) cannot train modules with "
            f"backprop='reversible' ({names}). DDP looks for unused parameters by walking the "
            "forward's autograd graph, and the parameters of reversible blocks are not in it: "
            "rev_det's reversible Function computes their gradients inside its own backward, by "
            "re-running the blocks. DDP would take them all for unused, mark them ready after "
            "forward, and fail when their gradients arrive in backward ('marked as ready "
            "twice'). Build DDP with find_unused_parameters=False (Detectron2's default; "
            "LazyConfig: train.ddp.find_unused_parameters=False), or train with "
            "backprop='checkpoint' or 'autograd' (cfg.MODEL.REV.BACKPROP, or the modules' "
            "backprop argument), which work with find_unused_parameters=True."
        )
    return model
