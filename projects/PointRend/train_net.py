#!/usr/bin/env python
"""Train and evaluate Detectron2's PointRend with rev_det's backbones (yacs configs).

Detectron2's own ``projects/PointRend/train_net.py`` plus what rev_det needs, which is what any
existing Detectron2 project adds to use these backbones:

1. ``import rev_det`` (registers the backbones and the shapes datasets);
2. ``rev_det.add_revdet_config(cfg)`` before ``merge_from_file``;
3. ``MODEL.BACKBONE.NAME: "build_rev_vit_backbone"`` (or ``build_rev_mvit_backbone``) in the yaml.

The trainer is ``rev_det.runs.Trainer``, as in ``projects/train_net.py`` (rev_det's AdamW with
layer-wise lr decay, a COCO evaluator), and the flags are the same: ``--config-file``,
``--eval-only``, ``--resume``, ``--num-gpus``, ... and ``KEY VALUE`` overrides. For example::

    python projects/PointRend/train_net.py \
        --config-file projects/PointRend/configs/pointrend_rcnn_rev_vit_shapes.yaml
"""

from detectron2.engine import default_argument_parser, launch
from detectron2.projects.point_rend import add_pointrend_config

# Workers started by `launch` import this file anew, so rev_det is registered in each of them.
import rev_det  # noqa: F401
from rev_det.runs import Trainer, load_yacs_config


def main(args):
    # load_yacs_config adds rev_det's keys (step 2) after PointRend's.
    cfg = load_yacs_config(args, extra_config=(add_pointrend_config,))
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
