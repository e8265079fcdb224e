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
import weakref

import detectron2.utils.comm as comm
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils.logger import setup_logger

# Workers started by `launch` import this file anew, so importing rev_det here registers its
# backbones and datasets in every process.
import rev_det
from rev_det.checkpoint import AtomicCheckpointer, IterationSeeder
from rev_det.checks import (
    YACS,
    CheckedMapper,
    OutputDirLock,
    check_no_flags_in_overrides,
    check_num_classes,
    check_yacs_config,
    divergence_advice,
)
from rev_det.data import build_resumable_train_loader, prepare_datasets
from rev_det.reversible import name_reversible_blocks
from rev_det.reversible.ddp import check_ddp_model
from rev_det.solver import build_optimizer
from rev_det.training import ReconstructionCheck, RevAMPTrainer
from rev_det.utils import detectron2_has_compiled_ops

logger = logging.getLogger("rev_det.train_net")


class Trainer(DefaultTrainer):
    """Detectron2's DefaultTrainer with rev_det's optimizer, a COCO evaluator, atomic
    checkpoints, and resumes that continue exactly as the uninterrupted run (with SEED >= 0)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        check_ddp_model(self.model)
        # The loader has read the dataset dicts: their categories must fit the classifier.
        summary = getattr(self.data_loader, "annotation_summary", None)
        check_num_classes(summary, cfg.DATASETS.TRAIN, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        if cfg.SOLVER.AMP.ENABLED:
            # v0.6's AMPTrainer needs CUDA and float16; this one autocasts on the model's device
            # to SOLVER.AMP.PRECISION (float16 with a grad scaler, or bfloat16).
            inner = self._trainer
            self._trainer = RevAMPTrainer(cfg, inner.model, inner.data_loader, inner.optimizer)

    def build_hooks(self):
        # DefaultTrainer builds a DetectionCheckpointer just before it calls this method, for
        # the checkpointing hook; replace it with one that saves atomically.
        self.checkpointer = AtomicCheckpointer(
            self.model,
            self.cfg.OUTPUT_DIR,
            strict_load=self.cfg.MODEL.REV.STRICT_LOAD,
            trainer=weakref.proxy(self),
        )
        seeder = [IterationSeeder(self.cfg.SEED)] if self.cfg.SEED >= 0 else []
        hooks = seeder + super().build_hooks()
        hooks.insert(-1, ReconstructionCheck(self.cfg))  # before the writer, which logs it
        return hooks

    @classmethod
    def build_model(cls, cfg):
        # Errors of the reversible backward then name the block (e.g. backbone.net.blocks.3).
        return name_reversible_blocks(super().build_model(cfg))

    # Detectron2 v0.6's DefaultTrainer checkpoints its hooks but not its inner trainer, so a
    # resumed run restarted the optimizer (AdamW moments) and AMP grad scaler from scratch
    # (detectron2 issue #4110); later versions save it under "_trainer" as here.
    def state_dict(self):
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: the optimizer starts afresh.")

    def resume_or_load(self, resume=True):
        super().resume_or_load(resume=resume)
        self.data_loader.start_iter = self.start_iter

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # Image files that cannot be read, or would be read wrongly, are named.
        mapper = CheckedMapper(DatasetMapper(cfg, False))
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

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


def load_config(args, extra_config=()):
    """The checked, frozen config of ``args``; ``extra_config``: functions adding a project's keys
    (e.g. PointRend's ``add_pointrend_config``), called before rev_det's and the file's."""
    cfg = get_cfg()
    for add_config in extra_config:
        add_config(cfg)
    rev_det.add_revdet_config(cfg)
    check_no_flags_in_overrides(args.opts)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    check_yacs_config(cfg)
    return cfg


def main(args, extra_config=()):
    cfg = load_config(args, extra_config)
    # Held before default_setup writes config.yaml and the log into OUTPUT_DIR.
    with OutputDirLock(cfg.OUTPUT_DIR, YACS.output_dir, enabled=comm.is_main_process()) as lock:
        default_setup(cfg, args)
        # Detectron2 sets up its own loggers only; rev_det's lines belong in log.txt too.
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="rev_det")
        lock.tidy()
        prepare_datasets(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
        if args.eval_only:
            model = Trainer.build_model(cfg)
            AtomicCheckpointer(
                model, save_dir=cfg.OUTPUT_DIR, strict_load=cfg.MODEL.REV.STRICT_LOAD
            ).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            res = Trainer.test(cfg, model)
            if comm.is_main_process():
                verify_results(cfg, res)
            return res
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        with divergence_advice(trainer, YACS, cfg.SOLVER.BASE_LR):
            return trainer.train()


def invoke_main(main_func=main):
    """Parse the command line and run ``main_func(args)`` in every process ``launch`` starts."""
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    return launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
