#!/usr/bin/env python
"""Train and evaluate LazyConfig (``.py``) configs with rev_det's backbones.

Same flags as ``train_net.py``; overrides are ``a.b=c`` pairs. For example::

    python projects/lazyconfig_train_net.py --config-file configs/demo/mask_rcnn_rev_vit_demo.py \
        train.device=cpu
    python projects/lazyconfig_train_net.py \
        --config-file configs/COCO/mask_rcnn_rev_vit_b_100ep.py --num-gpus 8
"""

import logging
import os

import detectron2.utils.comm as comm
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    SimpleTrainer,
    default_argument_parser,
    default_setup,
    default_writers,
    hooks,
    launch,
)
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils.logger import setup_logger

import rev_det  # noqa: F401  (registers backbones and datasets, also in launched workers)
from rev_det.checkpoint import AtomicCheckpointer, IterationSeeder
from rev_det.checks import (
    LAZY,
    OutputDirLock,
    check_lazy_config,
    check_lazy_overrides,
    check_no_flags_in_overrides,
    check_num_classes,
    complete_lazy_config,
    divergence_advice,
)
from rev_det.data import ResumableTrainLoader, prepare_datasets
from rev_det.reversible import name_reversible_blocks
from rev_det.reversible.ddp import check_ddp_model
from rev_det.training import ReconstructionCheck, RevAMPTrainer

logger = logging.getLogger("rev_det.lazyconfig_train_net")


def dataset_names(cfg, splits=("train", "test")):
    names = []
    for split in splits:
        loader = cfg.dataloader.get(split)
        if loader is not None:
            dataset_names = loader.dataset.names
            names += [dataset_names] if isinstance(dataset_names, str) else list(dataset_names)
    return names


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(results)
    return results


def do_train(args, cfg):
    complete_lazy_config(cfg)  # for configs loaded elsewhere than main()
    # Errors of the reversible backward then name the block (e.g. backbone.net.blocks.3).
    model = name_reversible_blocks(instantiate(cfg.model))
    logger.info("Model:\n%s", model)
    model.to(cfg.train.device)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    train_loader = instantiate(cfg.dataloader.train)

    # The loader has read the dataset dicts: their categories must fit the classifier.
    roi_heads = cfg.model.get("roi_heads", {})
    check_num_classes(
        getattr(train_loader, "annotation_summary", None),
        dataset_names(cfg, ("train",)),
        roi_heads.get("num_classes", None),
        LAZY,
    )

    model = check_ddp_model(create_ddp_model(model, **cfg.train.ddp))
    if cfg.train.amp.enabled:
        # v0.6's AMPTrainer needs CUDA and float16; this one autocasts on the model's device.
        precision = cfg.train.amp.get("precision", "float16")
        trainer = RevAMPTrainer(model, train_loader, optimizer, precision=precision)
    else:
        trainer = SimpleTrainer(model, train_loader, optimizer)
    checkpointer = AtomicCheckpointer(
        model,
        cfg.train.output_dir,
        strict_load=cfg.train.strict_load,
        trainer=trainer,
    )
    main_process = comm.is_main_process()
    seed = cfg.train.seed
    trainer.register_hooks(
        [
            IterationSeeder(seed) if seed >= 0 else None,  # first: before the others' before_step
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (
                hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer)
                if main_process
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            ReconstructionCheck(**cfg.train.check_reconstruction),
            (
                hooks.PeriodicWriter(
                    default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if main_process
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    if isinstance(train_loader, ResumableTrainLoader):
        train_loader.start_iter = start_iter
    elif start_iter:
        logger.warning(
            "dataloader.train is not rev_det.data.build_resumable_train_loader: the resumed run "
            "starts the data order anew and differs from an uninterrupted run."
        )
    with divergence_advice(trainer, LAZY, cfg.optimizer.get("lr", None)):
        trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    check_no_flags_in_overrides(args.opts)
    cfg = LazyConfig.load(args.config_file)
    complete_lazy_config(cfg)
    check_lazy_overrides(cfg, args.opts)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    check_lazy_config(cfg)
    output_dir = cfg.train.output_dir
    # Held before default_setup writes config.yaml and the log into the output directory.
    with OutputDirLock(output_dir, LAZY.output_dir, enabled=comm.is_main_process()) as lock:
        default_setup(cfg, args)
        # Detectron2 sets up its own loggers only; rev_det's lines belong in log.txt too.
        setup_logger(output_dir, distributed_rank=comm.get_rank(), name="rev_det")
        lock.tidy()
        prepare_datasets(dataset_names(cfg))
        if args.eval_only:
            model = instantiate(cfg.model)
            model.to(cfg.train.device)
            model = create_ddp_model(model)
            checkpointer = AtomicCheckpointer(model, output_dir, strict_load=cfg.train.strict_load)
            checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
            return do_test(cfg, model)
        do_train(args, cfg)


def invoke_main():
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
