#!/usr/bin/env python
"""Pretrain the trunk of a detector config on the shapes generator and export it for fine-tuning.

The trunk is built from the detector's own config (same class, sizes and parameter names), trained
by dense shape segmentation and object classification on the generator's "pretrain" image stream
(see :mod:`rev_det.demo.pretrain`; never an image of ``revdet_shapes_train`` or ``_val``), and
written as a checkpoint that ``MODEL.WEIGHTS`` / ``train.init_checkpoint`` load with
``MODEL.REV.STRICT_LOAD``.

Example (the demo's pretrained trunk, rev_det/model_zoo/weights/rev_vit_demo_trunk.pth)::

    python tools/pretrain_trunk.py --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml \\
        --output-dir output/pretrain_demo --export rev_vit_demo_trunk.pth --half

``--resume`` continues an interrupted run in ``--output-dir`` exactly where it stopped;
``--init OTHER_RUN/pretrain_last.pth`` starts a further stage from another run's weights.
"""

import argparse
import json
import logging
import os
import sys
import time

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from detectron2.utils.logger import setup_logger

import rev_det
from rev_det.demo.pretrain import (
    PretrainSchedule,
    ShapesSegmentation,
    detector_trunk,
    export_trunk,
    pretrain,
    trainable_norms,
)
from rev_det.utils import machine

logger = logging.getLogger("rev_det.pretrain_trunk")


def parse_args(argv=None):
    defaults = PretrainSchedule()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, help="the detector's yacs config")
    p.add_argument("--output-dir", required=True, help="run state and log")
    p.add_argument("--export", help="write the pretrained trunk here when training ends")
    p.add_argument("--half", action="store_true", help="export float16 weights (half the size)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    p.add_argument(
        "--init",
        help="start from the trunk and head of an earlier run (its pretrain_last.pth): a further "
        "stage with this run's schedule; give it another --seed to see new images",
    )
    p.add_argument("--iterations", type=int, default=defaults.iterations)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--crop", type=int, default=defaults.crop, help="square crop side")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--num-workers", type=int, default=1, help="image-drawing processes")
    p.add_argument("--checkpoint-period", type=int, default=100)
    p.add_argument("--log-period", type=int, default=20)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides of the config")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    setup_logger(os.path.join(args.output_dir, "log.txt"), name="rev_det")
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    schedule = PretrainSchedule(
        iterations=args.iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        crop=args.crop,
        seed=args.seed,
    )
    torch.manual_seed(schedule.seed)
    prefix, trunk = detector_trunk(build_backbone(cfg))
    trunk = trainable_norms(trunk)  # the detector freezes them; pretraining learns them
    logger.info(
        "Pretraining %s (%s, backprop %s, %.2fM parameters): %s",
        prefix,
        type(trunk).__name__,
        getattr(trunk, "backprop", "autograd"),
        sum(p.numel() for p in trunk.parameters()) / 1e6,
        schedule,
    )
    dataset = ShapesSegmentation(
        schedule.iterations * schedule.batch_size,
        schedule.crop,
        cfg.MODEL.PIXEL_MEAN,
        cfg.MODEL.PIXEL_STD,
        cfg.INPUT.FORMAT,
        scales=tuple(cfg.INPUT.MIN_SIZE_TRAIN),
        seed=schedule.seed,
    )
    result = pretrain(
        trunk,
        dataset,
        schedule,
        args.output_dir,
        resume=args.resume,
        checkpoint_period=args.checkpoint_period,
        log_period=args.log_period,
        num_workers=args.num_workers,
        init=args.init,
    )
    if args.export:
        provenance = {
            "command": " ".join(["python", "tools/pretrain_trunk.py", *sys.argv[1:]]),
            "config_file": args.config_file,
            "schedule": vars(schedule),
            "init": args.init,
            "final_loss": result["loss"],
            "final_object_accuracy": result["accuracy"],
            "seconds_this_run": round(result["seconds"], 1),
            "machine": machine(),
            "torch": str(torch.__version__),
            "date": time.strftime("%Y-%m-%d"),
        }
        export_trunk(trunk, args.export, prefix, half=args.half, provenance=provenance)
        logger.info("Wrote the pretrained trunk to %s: %s", args.export, json.dumps(provenance))
    return result


if __name__ == "__main__":
    main()
