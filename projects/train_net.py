#!/usr/bin/env python
"""Train and evaluate Detectron2 models with rev_det's backbones from yacs configs.

The Detectron2 ``tools/train_net.py`` experience: ``--config-file``, ``--eval-only``,
``--resume``, ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url`` and
``KEY VALUE`` overrides. For example::

    python projects/train_net.py --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml \
        MODEL.DEVICE cpu
    python projects/train_net.py --config-file configs/COCO/mask_rcnn_rev_vit_b.yaml \
        --num-gpus 8
"""

import logging
import os

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results

# Workers started by `launch` import this file anew, so importing rev_det here registers its
# backbones and datasets in every process.
import rev_det
from rev_det.data import prepare_datasets
from rev_det.solver import build_optimizer
from rev_det.utils import detectron2_has_compiled_ops

logger = logging.getLogger("rev_det.train_net")


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with rev_det's optimizer and a COCO evaluator."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        # The fast evaluator is C++; a pure-Python Detectron2 build uses pycocotools.
        return COCOEvaluator(
            dataset_name, output_dir=output_folder, use_fast_impl=detectron2_has_compiled_ops()
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def setup(args):
    cfg = get_cfg()
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


def invoke_main():
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
