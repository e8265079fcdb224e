"""AdamW with layer-wise learning-rate decay for transformer trunks (the ViTDet/MViTv2 recipe).

:func:`build_optimizer` is the yacs builder that honours ``SOLVER.OPTIMIZER`` (and
``SOLVER.STEP_IN_BACKWARD``). Detectron2's stock ``DefaultTrainer`` builds SGD whatever that key
says; :mod:`rev_det.optimizer_guard` (``expect_optimizer``, importable from here too) stops such
a run at its first step.
"""

import logging
import re
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups
from torch import nn

from .modeling.layers import LayerNorm2d
from .optimizer_guard import expect_optimizer
from .step_in_backward import check_step_in_backward, step_in_backward

__all__ = ["get_optimizer_params", "lr_decay_layer_id", "build_optimizer", "expect_optimizer"]

logger = logging.getLogger(__name__)

_NORMS = (nn.LayerNorm, LayerNorm2d, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
# Position embeddings are a lookup table, not a linear map: decaying them only shrinks them.
_NO_DECAY = re.compile(r"(^|\.)(pos_embed|rel_pos_h|rel_pos_w|rel_pos_t)$")
_BLOCK = re.compile(r"(^|\.)blocks\.(\d+)\.")
_STEM = re.compile(r"(^|\.)patch_embed\.stem\.")
_EMBEDDING = re.compile(r"(^|\.)patch_embed\.")


def lr_decay_layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for lr decay: 0 for the embeddings, i + 1 for ``blocks.i``, and
    ``num_layers + 1`` for everything after the trunk (pyramid, heads, the fusion norm)."""
    if ".pos_embed" in name or ".patch_embed" in name or name.startswith(("pos_embed", "patch_")):
        return 0
    match = _BLOCK.search(name)
    if match is not None:
        return int(match.group(2)) + 1
    return num_layers + 1


def get_optimizer_params(
    model: nn.Module,
    base_lr: Optional[float] = None,
    weight_decay: float = 0.0,
    weight_decay_norm: float = 0.0,
    lr_decay_rate: float = 1.0,
    num_layers: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Parameter groups with layer-wise lr decay and no weight decay on norms and positions.

    A parameter at depth ``i`` (see :func:`lr_decay_layer_id`) gets
    ``lr = base_lr * lr_decay_rate ** (num_layers + 1 - i)``.

    Args:
        model: the model (its trunk's blocks are named ``...blocks.{i}...``).
        base_lr: learning rate before decay (None: the optimizer's ``lr``).
        weight_decay: weight decay of ordinary weights.
        weight_decay_norm: weight decay of normalisation parameters.
        lr_decay_rate: per-block decay; 1.0 disables it.
        num_layers: number of trunk blocks; inferred from the largest ``blocks.{i}`` if None.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # A convolutional stem is not in ViT / MAE weights: it and the projection after it (of
    # another kernel size than ViT's) start from their initialisation, and take the full lr
    # rather than layer 0's decayed one.
    fresh_embedding = any(_STEM.search(n) for n, _ in named)
    if num_layers is None:
        ids = [int(m.group(2)) for n, _ in named for m in [_BLOCK.search(n)] if m]
        num_layers = max(ids) + 1 if ids else 0
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters()}
    groups = []
    for name, p in named:
        layer = lr_decay_layer_id(name, num_layers)
        if fresh_embedding and _EMBEDDING.search(name):
            layer = num_layers + 1
        scale = lr_decay_rate ** (num_layers + 1 - layer)
        if id(p) in norm_params:
            decay = weight_decay_norm
        elif _NO_DECAY.search(name):
            decay = 0.0
        else:
            decay = weight_decay
        group = {"params": [p], "weight_decay": decay}
        if base_lr is not None:
            group["lr"] = base_lr * scale
        groups.append(group)
    return reduce_param_groups(groups)


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.SOLVER``: "ADAMW" (layer-wise lr decay) or Detectron2's SGD,
    stepping inside backward with ``SOLVER.STEP_IN_BACKWARD`` (:mod:`rev_det.step_in_backward`)."""
    optimizer = _build_optimizer(cfg, model)
    if cfg.SOLVER.STEP_IN_BACKWARD:
        amp = cfg.SOLVER.AMP
        fp16 = amp.ENABLED and amp.PRECISION == "float16"
        check_step_in_backward(optimizer, fp16, "SOLVER.STEP_IN_BACKWARD")
        step_in_backward(optimizer, model)
    return optimizer


def _build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "SGD":
        from detectron2.solver import build_optimizer as d2_build_optimizer

        return d2_build_optimizer(cfg, model)
    if name != "ADAMW":
        raise ValueError(f"SOLVER.OPTIMIZER = {cfg.SOLVER.OPTIMIZER!r}; choose 'SGD' or 'ADAMW'.")
    params = get_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        lr_decay_rate=cfg.SOLVER.LR_DECAY_RATE,
    )
    optimizer = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
    return optimizer(params, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS))
