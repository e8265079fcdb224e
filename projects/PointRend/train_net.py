#!/usr/bin/env python
"""Train and evaluate Detectron2's PointRend with rev_det's backbones (yacs configs).

Detectron2's own ``projects/PointRend/train_net.py`` plus what rev_det needs, which is what any
existing Detectron2 project adds to use these backbones:

1. ``import rev_det`` (registers the backbones and the shapes datasets);
2. ``rev_det.add_revdet_config(cfg)`` before ``merge_from_file``;
3. ``MODEL.BACKBONE.NAME: "build_rev_vit_backbone"`` (or ``build_rev_mvit_backbone``) in the yaml.

The trainer is ``projects/train_net.py``'s ``Trainer`` (rev_det's AdamW with layer-wise lr decay,
a COCO evaluator), and the flags are the same: ``--config-file``, ``--eval-only``, ``--resume``,
``--num-gpus``, ... and ``KEY VALUE`` overrides. For example::

    python projects/PointRend/train_net.py \
        --config-file projects/PointRend/configs/pointrend_rcnn_rev_vit_shapes.yaml
"""

import importlib.util
import os

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.projects.point_rend import add_pointrend_config

# Workers started by `launch` import this file anew, so rev_det is registered in each of them.
import rev_det
from rev_det.data import prepare_datasets


def _load_rev_det_train_net():
    """projects/train_net.py, loaded by path: it is a script beside this folder, not a package."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_net.py")
    spec = importlib.util.spec_from_file_location("rev_det_train_net", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Trainer = _load_rev_det_train_net().Trainer


def setup(args):
    cfg = get_cfg()
    add_pointrend_config(cfg)
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    prepare_datasets(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


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
