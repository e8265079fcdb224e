"""AdamW over rev_det's parameter groups (no weight decay on norms, biases and position tables;
optional layer-wise lr decay) and a step schedule with linear warm-up.

Each config sets ``optimizer.lr``, ``optimizer.weight_decay``, the decay steps
``lr_multiplier.scheduler.milestones`` and ``lr_multiplier.warmup_length`` (a fraction of
``train.max_iter``).
"""

import torch
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from rev_det.solver import get_optimizer_params

optimizer = L(torch.optim.AdamW)(
    params=L(get_optimizer_params)(base_lr="${..lr}", weight_decay="${..weight_decay}"),
    lr=1e-4,
    betas=(0.9, 0.999),
    weight_decay=0.1,
)

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[], num_updates="${train.max_iter}"
    ),
    warmup_length=0.0,
    warmup_factor=0.001,
)
