#!/usr/bin/env python
"""Train and evaluate LazyConfig (``.py``) configs with rev_det's backbones.

Same flags as ``train_net.py``; overrides are ``a.b=c`` pairs. For example::

    python projects/lazyconfig_train_net.py --config-file configs/demo/mask_rcnn_rev_vit_demo.py \
        train.device=cpu
    python projects/lazyconfig_train_net.py \
        --config-file configs/COCO/mask_rcnn_rev_vit_b_100ep.py --num-gpus 8

The training loop and rev_det's additions to Detectron2's training are in
:mod:`rev_det.runs`.
"""

from detectron2.engine import default_argument_parser, launch

import rev_det  # noqa: F401  (registers backbones and datasets, also in launched workers)
from rev_det.runs import load_lazy_config, run_lazy


def main(args):
    cfg = load_lazy_config(args)
    return run_lazy(cfg, args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
