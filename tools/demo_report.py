#!/usr/bin/env python
"""Pictures and a memory report for a trained demo run (``make demo`` runs it after training).

Writes into the run's output directory:
  * ``predictions.png``: a grid of predictions on validation images (Detectron2's Visualizer),
    those scoring above ``--confidence-threshold`` (0.3); it says how many images had none;
  * ``loss_curve.png``: the training losses from ``metrics.json`` (Detectron2 appends to it: where
    a run restarted, its records replace those of the stopped run from that iteration on);
  * ``memory_report.md`` / ``memory_report.json``: the peak training memory per image of one
    training step of the same config with backprop "reversible" and "autograd" (and
    "checkpoint"), measured exactly with rev_det's tensor-memory tracker.

Usage: ``python tools/demo_report.py --config-file configs/demo/mask_rcnn_rev_vit_demo.yaml``
(add ``KEY VALUE`` overrides as for train_net.py).
"""

import argparse
import json
import os
from typing import Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from PIL import Image  # noqa: E402

import rev_det  # noqa: E402
from rev_det.data import fixed_training_batch, prepare_datasets  # noqa: E402
from rev_det.modeling import set_backprop  # noqa: E402
from rev_det.utils import MiB, training_step_peak  # noqa: E402

SCORE_THRESHOLD = 0.3  # default of --confidence-threshold, as tools/predict.py
LOSSES = ("total_loss", "loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


def load_cfg(args):
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def latest_run(records: List[Dict]) -> Tuple[List[Dict], int]:
    """The training records of the latest run in an appended ``metrics.json``.

    Detectron2's JSONWriter appends, so a run that was stopped and started again (from scratch,
    or resumed from an earlier checkpoint) leaves records whose iterations go back. A record at
    iteration i replaces every earlier record at i or later: what remains is the latest run,
    after what it resumed from.

    Returns:
        The records kept, in order, and how many were dropped.
    """
    kept: List[Dict] = []
    for record in records:
        while kept and kept[-1]["iteration"] >= record["iteration"]:
            kept.pop()
        kept.append(record)
    return kept, len(records) - len(kept)


def plot_losses(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    records, dropped = latest_run([r for r in records if "total_loss" in r])
    if dropped:
        print(
            f"note: metrics.json holds {dropped} training records of an earlier, stopped run "
            "that the latest run replaced; the loss curve shows the latest run only"
        )
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in LOSSES:
        iters = [r["iteration"] for r in records if key in r]
        ax.plot(
            iters,
            [r[key] for r in records if key in r],
            label=key,
            lw=2 if key == "total_loss" else 1,
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the logging window)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("rev_det demo: RevViT Mask R-CNN on revdet_shapes_train")
    path = os.path.join(output_dir, "loss_curve.png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def prediction_grid(cfg, output_dir, threshold=SCORE_THRESHOLD, num_images=8, columns=4, cell=320):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = os.path.join(output_dir, "model_final.pth")
    predictor = DefaultPredictor(cfg)
    name = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(name)
    cells, empty = [], 0
    for record in DatasetCatalog.get(name)[:num_images]:
        image = read_image(record["file_name"], format="RGB")
        # DefaultPredictor takes images in cfg.INPUT.FORMAT order.
        instances = predictor(image if cfg.INPUT.FORMAT == "RGB" else image[:, :, ::-1])[
            "instances"
        ]
        instances = instances[instances.scores > threshold].to("cpu")
        empty += len(instances) == 0
        drawn = Visualizer(image, metadata).draw_instance_predictions(instances).get_image()
        canvas = Image.new("RGB", (cell, cell), (255, 255, 255))
        tile = Image.fromarray(drawn)
        tile.thumbnail((cell, cell))
        canvas.paste(tile, ((cell - tile.width) // 2, (cell - tile.height) // 2))
        cells.append(np.asarray(canvas))
    drawn_images = len(cells)
    while len(cells) % columns:
        cells.append(np.full_like(cells[0], 255))
    rows = [np.concatenate(cells[i : i + columns], axis=1) for i in range(0, len(cells), columns)]
    path = os.path.join(output_dir, "predictions.png")
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    if empty:
        print(
            f"warning: {empty} of {drawn_images} pictures in {path} show no prediction: none scored "
            f"above {threshold}; lower --confidence-threshold to draw weaker ones (an untrained or "
            "briefly trained model scores low)"
        )
    return path


def memory_report(cfg, output_dir, batch_size=2):
    """Peak memory of one training step per backprop mode, same weights and same batch."""
    batch = fixed_training_batch(cfg, batch_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    results = {}
    for mode in ("reversible", "checkpoint", "autograd"):
        set_backprop(model, mode)
        torch.manual_seed(0)
        results[mode] = training_step_peak(model, batch) / batch_size / MiB
    sizes = ", ".join(f"{d['image'].shape[1]}x{d['image'].shape[2]}" for d in batch)
    lines = [
        "# Demo memory report",
        "",
        f"Peak training memory per image of one Mask R-CNN training step (forward, losses,"
        f" backward) for `{cfg.MODEL.BACKBONE.NAME}` with pyramid `{cfg.MODEL.REV.PYRAMID}`,"
        f" batch of {batch_size} images ({sizes}), fp32 on CPU, measured exactly with"
        " `rev_det.utils.MemoryTracker` (parameters not counted; gradients counted).",
        "",
        "| backprop | MiB per image | autograd / this |",
        "|---|---|---|",
    ]
    for mode, mib in results.items():
        lines.append(f"| {mode} | {mib:.1f} | {results['autograd'] / mib:.2f}x |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(output_dir, "memory_report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(output_dir, "memory_report.json"), "w") as f:
        json.dump({"mib_per_image": results, "batch_size": batch_size, "sizes": sizes}, f)
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=SCORE_THRESHOLD,
        help=f"draw predictions scoring above this (default {SCORE_THRESHOLD})",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    cfg = load_cfg(args)
    prepare_datasets(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    output_dir = cfg.OUTPUT_DIR
    print("wrote", plot_losses(output_dir))
    print("wrote", prediction_grid(cfg, output_dir, args.confidence_threshold))
    print(memory_report(cfg, output_dir))


if __name__ == "__main__":
    main()
