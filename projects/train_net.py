#!/usr/bin/env python
"""Train and evaluate Detectron2 models with rev_det's backbones from yacs configs.

The Detectron2 ``tools/train_net.py`` experience: ``--config-file``, ``--eval-only``,
``--resume``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url`` and
``KEY VALUE`` overrides. For example::

    python projects/train_net.py --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml \
        MODEL.DEVICE cpu
    python projects/train_net.py --config-file configs/COCO/mask_rcnn_rev_vit_b.yaml \
        --num-gpus 8

The trainer and rev_det's additions to Detectron2's training are in :mod:`rev_det.runs`.
"""

from detectron2.engine import default_argument_parser, launch

# Workers started by `launch` import this file anew, so importing rev_det here registers its
# backbones and datasets in every process.
import rev_det  # noqa: F401
from rev_det.runs import Trainer, load_yacs_config


def main(args):
    cfg = load_yacs_config(args)
    return Trainer.run(cfg, args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
