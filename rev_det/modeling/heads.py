"""Recomputed detection heads: Detectron2's RPN, box and mask heads keeping only their inputs
and outputs between forward and backward (``MODEL.REV.RECOMPUTE_HEADS``).

Once the trunk and pyramid are reversible, the heads hold most of what a Mask R-CNN step keeps
for backward: the RPN head's convolutions on p2-p6 and the box head's four convolutions and
norms on 512 sampled regions each keep more than the trunk and pyramid together (measured in
``docs/whole_step.md``, "Where the rest goes"). Each head here runs through
``torch.utils.checkpoint`` (non-reentrant): its input (a pyramid level, the pooled regions) is
kept, and its hidden activations are computed again in backward. Gradients are autograd's: the
same operations run again on the same inputs (the heads draw no random numbers).

::

    p2..p6 ──rpn_head──> logits, deltas        box features ──box_head──> (R, 1024)
           (kept)  recomputed  (kept: losses)     (kept)     recomputed       (kept)

The heads keep their Detectron2 names (``proposal_generator.rpn_head.conv``,
``roi_heads.box_head.conv1``, ``roi_heads.mask_head.mask_fcn1``...): only their forward is
recomputed, so checkpoints load as before.
"""

import functools
import logging
from typing import Dict, List, Tuple

import torch
from detectron2.modeling import build_model
from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["recompute_heads", "build_detector"]

logger = logging.getLogger(__name__)


# (head class, method) -> its subclass whose method is recomputed; one per class.
_RECOMPUTED: Dict[Tuple[type, str], type] = {}


def _recomputed_class(cls: type, method_name: str) -> type:
    """A subclass of ``cls`` whose ``method_name`` runs through checkpoint while training."""
    key = (cls, method_name)
    if key not in _RECOMPUTED:
        method = getattr(cls, method_name)

        @functools.wraps(method)
        def recomputed(self, *args):
            if self.training and torch.is_grad_enabled():
                return checkpoint(method, self, *args, use_reentrant=False)
            return method(self, *args)

        attrs = {method_name: recomputed, "__module__": __name__}
        _RECOMPUTED[key] = type(f"Recomputed{cls.__name__}", (cls,), attrs)
    return _RECOMPUTED[key]


def recompute_heads(model: nn.Module) -> List[str]:
    """Make the RPN, box and mask heads of ``model`` recompute their activations in backward.

    Recomputes the forward of every :class:`StandardRPNHead` and :class:`FastRCNNConvFCHead`
    (each stage's of a cascade) and the ``layers`` of every mask head, in place: each head
    becomes an instance of a subclass of its class (``RecomputedFastRCNNConvFCHead``...) with
    the same parameters and names. Calling it again changes nothing.

    Args:
        model: a Detectron2 detector (GeneralizedRCNN, cascade or not).

    Returns:
        The names of the heads wrapped.

    Raises:
        ValueError: a head to recompute has batch norm, whose running statistics the
            recomputation would update twice per step (use "GN", "LN" or "FrozenBN"), or the
            model has none of these heads.
    """
    wrapped = []
    for name, module in model.named_modules():
        if isinstance(module, (StandardRPNHead, FastRCNNConvFCHead)):
            method_name = "forward"
        elif isinstance(module, BaseMaskRCNNHead):
            method_name = "layers"
        else:
            continue
        batch_norms = [
            n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if batch_norms:
            raise ValueError(
                f"MODEL.REV.RECOMPUTE_HEADS: {name}.{batch_norms[0]} is a batch norm, whose "
                "running statistics would be updated again when the head is recomputed in "
                "backward. Give the heads 'GN', 'LN' or 'FrozenBN' (MODEL.ROI_BOX_HEAD.NORM, "
                "MODEL.ROI_MASK_HEAD.NORM), or set MODEL.REV.RECOMPUTE_HEADS to False."
            )
        if type(module) not in _RECOMPUTED.values():
            module.__class__ = _recomputed_class(type(module), method_name)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(
            "MODEL.REV.RECOMPUTE_HEADS: the model has no Detectron2 RPN, box or mask head to "
            f"recompute ({type(model).__name__}); set MODEL.REV.RECOMPUTE_HEADS to False."
        )
    logger.info("Heads recomputed in backward: %s", ", ".join(wrapped))
    return wrapped


def build_detector(cfg) -> nn.Module:
    """Detectron2's ``build_model(cfg)``, its heads recomputed if ``MODEL.REV.RECOMPUTE_HEADS``."""
    model = build_model(cfg)
    if cfg.MODEL.REV.RECOMPUTE_HEADS:
        recompute_heads(model)
    return model
