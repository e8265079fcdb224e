#!/usr/bin/env python
"""Accuracy parity of the demo recipe: reversible vs ordinary autograd, with run-to-run noise.

Fine-tunes the demo config (pretrained trunk) once per (backprop, pyramid, seed) through
``projects/train_net.py``, reads each run's final COCO box / mask AP on ``revdet_shapes_val``
from its ``metrics.json``, evaluates its final weights on ``revdet_shapes_test`` (600 held-out
images: on the 100 validation images two models' AP differs by a few points by luck alone) and
measures the peak training memory per image of one step of that configuration (exact CPU
tracker, as ``tools/demo_report.py``). Writes ``results.json`` and ``results.md`` (a table with
the mean and spread over seeds) into ``--out``. A run whose ``metrics.json`` already holds the
final AP is not trained again, nor evaluated again once its ``test_ap.json`` exists, so an
interrupted comparison continues where it stopped; ``--no-train`` tabulates only the runs
already there (a comparison still in progress).

The variants separate the two things rev_det changes: the backprop mode (reversible against
autograd on the same architecture) and the pyramid (rev_det's reversible one against ViTDet's
simple one).

Example (docs/demo.md)::

    python tools/demo_parity.py --seeds 42 43 --out benchmarks/demo_parity

It takes one ``make demo`` training and two minutes of test-set evaluation per run (8 runs with
two seeds); it is not part of CI.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
from detectron2.modeling import build_model

from rev_det.data import SHAPES_TEST_DATASET, fixed_training_batch
from rev_det.trainer import Trainer, load_weights, load_yacs_config
from rev_det.utils import MiB, machine, training_step_peak, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.yaml")
# (MODEL.REV.BACKPROP, MODEL.REV.PYRAMID): rev_det's model; the same model with stored
# activations; the trunk with ViTDet's pyramid, reversible and with stored activations (what a
# user would otherwise train).
VARIANTS = (
    ("reversible", "reversible"),
    ("autograd", "reversible"),
    ("reversible", "simple"),
    ("autograd", "simple"),
)


def final_ap(output_dir: str) -> Optional[Dict[str, float]]:
    """The last ``bbox/AP`` and ``segm/AP`` in ``output_dir/metrics.json``, or None."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    found = {}
    with open(path) as f:
        for line in f:
            record = json.loads(line) if line.strip() else {}
            for task in ("bbox", "segm"):
                if f"{task}/AP" in record:
                    found[task] = record[f"{task}/AP"]
    return found if len(found) == 2 else None


def _cfg(config_file: str, opts: List[str]):
    return load_yacs_config(argparse.Namespace(config_file=config_file, opts=opts))


def test_ap(config_file: str, opts: List[str], output_dir: str) -> Optional[Dict[str, float]]:
    """Box and mask AP of the run's final weights on ``revdet_shapes_test`` (cached in
    ``output_dir/test_ap.json``), or None if the run has no final weights."""
    cached = os.path.join(output_dir, "test_ap.json")
    if os.path.isfile(cached):
        with open(cached) as f:
            return json.load(f)
    weights = os.path.join(output_dir, "model_final.pth")
    if not os.path.isfile(weights):
        return None
    test_dir = os.path.join(output_dir, "test_eval")
    cfg = _cfg(
        config_file, opts + ["DATASETS.TEST", f'("{SHAPES_TEST_DATASET}",)', "OUTPUT_DIR", test_dir]
    )
    model = Trainer.build_model(cfg)
    load_weights(model, cfg.OUTPUT_DIR, weights, strict_load=True, resume=False)
    results = Trainer.test(cfg, model)  # the dataset's loader generates the images if needed
    ap = {task: results[task]["AP"] for task in ("bbox", "segm")}
    with open(cached, "w") as f:
        json.dump(ap, f)
    return ap


def step_memory(config_file: str, opts: List[str], batch_size: int = 2) -> float:
    """Peak MiB per image of one training step (activations and gradients), on the same images
    for every run."""
    cfg = _cfg(config_file, opts)
    batch = fixed_training_batch(cfg, batch_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    return training_step_peak(model, batch) / batch_size / MiB


def run(
    config_file: str,
    backprop: str,
    pyramid: str,
    seed: int,
    out: str,
    extra: List[str],
    train: bool = True,
) -> Optional[dict]:
    """One run's result; trained first unless it exists (None if it does not and not ``train``)."""
    output_dir = os.path.join(out, f"{backprop}_{pyramid}_seed{seed}")
    opts = ["MODEL.REV.BACKPROP", backprop, "MODEL.REV.PYRAMID", pyramid, *extra]
    ap = final_ap(output_dir)
    seconds = None
    if ap is None and not train:
        print(f"not tabulated: {output_dir} has no final AP yet", flush=True)
        return None
    if ap is None:
        began = time.perf_counter()
        cmd = [sys.executable, os.path.join(ROOT, "projects", "train_net.py")]
        cmd += ["--config-file", config_file, *opts, "SEED", str(seed), "OUTPUT_DIR", output_dir]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        seconds = time.perf_counter() - began
        ap = final_ap(output_dir)
        if ap is None:
            raise RuntimeError(f"{output_dir}/metrics.json has no final bbox/segm AP.")
    test = test_ap(config_file, opts, output_dir)
    if test is None:
        print(f"not evaluated on {SHAPES_TEST_DATASET}: {output_dir} has no model_final.pth")
    return {
        "backprop": backprop,
        "pyramid": pyramid,
        "seed": seed,
        "box_ap": ap["bbox"],
        "mask_ap": ap["segm"],
        "test_box_ap": test and test["bbox"],
        "test_mask_ap": test and test["segm"],
        "train_and_eval_seconds": seconds,
        "output_dir": os.path.relpath(output_dir, ROOT),
    }


def _stat(values: List[float]) -> str:
    """Values per seed, then their mean and (spread)."""
    if not values:
        return "-"
    per_seed = " / ".join(f"{v:.1f}" for v in values)
    return f"{per_seed}: {sum(values) / len(values):.1f} ({max(values) - min(values):.1f})"


def table(runs: List[dict]) -> str:
    lines = [
        "| backprop + pyramid | test box AP | test mask AP | val box AP | val mask AP |"
        " MiB per image (one step) |",
        "|---|---|---|---|---|---|",
    ]
    for backprop, pyramid in VARIANTS:
        rs = [r for r in runs if (r["backprop"], r["pyramid"]) == (backprop, pyramid)]
        if not rs:
            continue
        cells = [
            _stat([r[key] for r in rs if r[key] is not None])
            for key in ("test_box_ap", "test_mask_ap", "box_ap", "mask_ap")
        ]
        lines.append(
            f"| {backprop} + {pyramid} | {' | '.join(cells)} | {rs[0]['mib_per_image']:.1f} |"
        )
    lines.append("")
    lines.append(
        f"AP per seed: mean (spread). test: {SHAPES_TEST_DATASET} (600 images); val: "
        "revdet_shapes_val (100 images, the demo's evaluation)."
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "demo_parity"))
    parser.add_argument(
        "--no-train", action="store_true", help="tabulate only the runs already in --out"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs = [
        run(args.config_file, backprop, pyramid, seed, args.out, args.opts, not args.no_train)
        for seed in args.seeds
        for backprop, pyramid in VARIANTS
    ]
    runs = [r for r in runs if r is not None]
    # The same for every seed of a variant (one fixed batch): measured once per variant.
    memory = {}
    for r in runs:
        variant = (r["backprop"], r["pyramid"])
        if variant not in memory:
            opts = ["MODEL.REV.BACKPROP", variant[0], "MODEL.REV.PYRAMID", variant[1], *args.opts]
            memory[variant] = step_memory(args.config_file, opts)
        r["mib_per_image"] = memory[variant]
    text = table(runs)
    write_results(
        args.out, text + "\n", {"config": args.config_file, "machine": machine(), "runs": runs}
    )
    print(text)
    return runs


if __name__ == "__main__":
    main()
