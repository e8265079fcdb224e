#!/usr/bin/env python
"""Accuracy parity of the demo recipe: reversible vs ordinary autograd, with run-to-run noise.

Fine-tunes the demo config (pretrained trunk) once per (backprop, pyramid, seed) through
``projects/train_net.py``, reads each run's final COCO box / mask AP on ``revdet_shapes_val``
from its ``metrics.json``, evaluates its final weights on ``revdet_shapes_test`` (600 held-out
images: on the 100 validation images two models' AP differs by a few points by luck alone) and
measures the peak training memory per image of one step of that configuration (exact CPU
tracker, as ``tools/demo_report.py``). Writes ``results.json`` and ``results.md`` (a table with
the mean and standard deviation over seeds) into ``--out``. A run whose ``metrics.json`` already holds the
final AP is not trained again, nor evaluated again once its ``test_ap.json`` exists, so an
interrupted comparison continues where it stopped; ``--no-train`` tabulates only the runs
already there (a comparison still in progress).

Two experiments (``--experiment``):

* ``parity`` (the default): the variants separate the two things rev_det changes: the backprop
  mode (reversible against autograd on the same architecture) and the pyramid (rev_det's
  reversible one against ViTDet's simple one).
* ``surrogate``: what an exact start from a pretrained plain ViT is worth
  (docs/vitdet_surrogate.md). A plain ViT trunk of the demo's size and stem (RevViTDet held at
  ``(alpha, beta) = (1, 0)``) is pretrained by ``tools/pretrain_trunk.py`` (the stand-in for MAE;
  ``--pretrain-iterations``, once, reused by later calls), then fine-tuned three ways with the
  demo's recipe and budget: ``plain`` (the ViT itself, autograd, ViTDet's pyramid: ViTDet's way,
  the reference), ``converted`` (``--source vit`` into RevViT, ViTDet's pyramid: a different
  function at the start) and ``surrogate`` (RevViTDet with its coupling schedule, reversible
  after the ramp).

Example (docs/demo.md)::

    python tools/demo_parity.py --seeds 42 43 --out benchmarks/demo_parity

It takes one ``make demo`` training and two minutes of test-set evaluation per run (8 runs with
two seeds); it is not part of CI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional

import torch
from detectron2.modeling import build_model

from rev_det.convert import build_target_trunk, convert_checkpoint, save_detectron2_checkpoint
from rev_det.data import SHAPES_TEST_DATASET, fixed_training_batch
from rev_det.runs import Trainer, load_weights, load_yacs_config
from rev_det.utils import MiB, machine, training_step_peak, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.yaml")
VITDET_DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vitdet_demo.yaml")


class Variant(NamedTuple):
    """One fine-tuning setting: its run directories' name, its table label, config and options."""

    name: str
    label: str
    config: str
    opts: List[str]


def _mode(backprop: str, pyramid: str) -> Variant:
    opts = ["MODEL.REV.BACKPROP", backprop, "MODEL.REV.PYRAMID", pyramid]
    return Variant(f"{backprop}_{pyramid}", f"{backprop} + {pyramid}", DEMO_CONFIG, opts)


# (MODEL.REV.BACKPROP, MODEL.REV.PYRAMID): rev_det's model; the same model with stored
# activations; the trunk with ViTDet's pyramid, reversible and with stored activations (what a
# user would otherwise train).
VARIANTS = (
    _mode("reversible", "reversible"),
    _mode("autograd", "reversible"),
    _mode("reversible", "simple"),
    _mode("autograd", "simple"),
)


def pretrained_plain_vit(out: str, iterations: int) -> str:
    """A plain ViT trunk of the RevViTDet demo (its coupling held at (1, 0)), pretrained by
    ``tools/pretrain_trunk.py`` into ``out/plain_vit_trunk.pth`` (reused if it is there)."""
    path = os.path.join(out, "plain_vit_trunk.pth")
    if not os.path.isfile(path):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain_trunk.py")]
        cmd += ["--config-file", VITDET_DEMO_CONFIG, "--output-dir", os.path.join(out, "pretrain")]
        cmd += ["--export", path, "--iterations", str(iterations), "--resume"]
        cmd += ["MODEL.REV.BACKPROP", "autograd"]
        print("running:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return path


def converted_to_revvit(trunk: str, out: str) -> str:
    """``trunk`` (a plain ViT's weights) converted by ``--source vit`` into the RevViT demo's
    trunk, as ``out/converted_rev_vit.pth``: an initialisation of another function."""
    path = os.path.join(out, "converted_rev_vit.pth")
    if not os.path.isfile(path):
        state = torch.load(trunk, map_location="cpu", weights_only=True)["model"]
        state = {k[len("backbone.net.") :]: v.float() for k, v in state.items()}
        target, prefix = build_target_trunk(DEMO_CONFIG, ["MODEL.REV.PYRAMID", "simple"])
        save_detectron2_checkpoint(convert_checkpoint("vit", state, target), prefix, path)
    return path


def surrogate_variants(out: str, pretrain_iterations: int) -> List[Variant]:
    """The three ways of fine-tuning one pretrained plain ViT (see the module docstring)."""
    trunk = pretrained_plain_vit(out, pretrain_iterations)
    plain = ["MODEL.REV.BACKPROP", "autograd", "MODEL.REV.COUPLING.ALPHA", "(1.0, 1.0)"]
    plain += ["MODEL.REV.COUPLING.BETA", "(0.0, 0.0)", "MODEL.WEIGHTS", trunk]
    converted = ["MODEL.REV.PYRAMID", "simple", "MODEL.REV.STRICT_LOAD", "False"]
    converted += ["MODEL.WEIGHTS", converted_to_revvit(trunk, out)]
    return [
        Variant("plain", "plain ViT, autograd (ViTDet's way)", VITDET_DEMO_CONFIG, plain),
        Variant("converted", "--source vit into RevViT", DEMO_CONFIG, converted),
        Variant(
            "surrogate",
            "RevViTDet, coupling schedule",
            VITDET_DEMO_CONFIG,
            ["MODEL.WEIGHTS", trunk],
        ),
    ]


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
    variant: Variant, seed: int, out: str, extra: List[str], train: bool = True
) -> Optional[dict]:
    """One run's result; trained first unless it exists (None if it does not and not ``train``)."""
    output_dir = os.path.join(out, f"{variant.name}_seed{seed}")
    config_file, opts = variant.config, [*variant.opts, *extra]
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
        "variant": variant.name,
        "seed": seed,
        "box_ap": ap["bbox"],
        "mask_ap": ap["segm"],
        "test_box_ap": test and test["bbox"],
        "test_mask_ap": test and test["segm"],
        "train_and_eval_seconds": seconds,
        "seconds_per_iteration": seconds_per_iteration(output_dir),
        "output_dir": os.path.relpath(output_dir, ROOT),
    }


def seconds_per_iteration(output_dir: str) -> Optional[float]:
    """The median of the training iterations' times in ``output_dir/metrics.json``."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        times = sorted(json.loads(line)["time"] for line in f if '"time"' in line)
    return times[len(times) // 2] if times else None


def _stat(values: List[float]) -> str:
    """Values per seed, then their mean ± sample standard deviation (the spread for two)."""
    if not values:
        return "-"
    per_seed = " / ".join(f"{v:.1f}" for v in values)
    if len(values) < 3:
        return f"{per_seed}: {statistics.fmean(values):.1f} ({max(values) - min(values):.1f})"
    return f"{per_seed}: {statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(runs: List[dict], variants: List[Variant]) -> str:
    lines = [
        "| variant | test box AP | test mask AP | val box AP | val mask AP |"
        " MiB per image (one step) | s per iteration |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        rs = [r for r in runs if r["variant"] == variant.name]
        if not rs:
            continue
        cells = [
            _stat([r[key] for r in rs if r[key] is not None])
            for key in ("test_box_ap", "test_mask_ap", "box_ap", "mask_ap")
        ]
        times = [r["seconds_per_iteration"] for r in rs if r.get("seconds_per_iteration")]
        time_cell = f"{sum(times) / len(times):.2f}" if times else "-"
        lines.append(
            f"| {variant.label} | {' | '.join(cells)} | {rs[0]['mib_per_image']:.1f} | "
            f"{time_cell} |"
        )
    lines.append("")
    lines.append(
        "AP per seed: mean ± sample standard deviation (with two seeds: mean (spread)). "
        f"test: {SHAPES_TEST_DATASET} (600 images); val: revdet_shapes_val (100 images, the "
        "demo's evaluation)."
    )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", choices=("parity", "surrogate"), default="parity")
    parser.add_argument(
        "--pretrain-iterations",
        type=int,
        default=3000,
        help="surrogate: steps of the plain ViT trunk's pretraining (the demo trunk's had 3000)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--out", default=os.path.join(ROOT, "output", "demo_parity"))
    parser.add_argument(
        "--no-train", action="store_true", help="tabulate only the runs already in --out"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.experiment == "surrogate":
        variants = surrogate_variants(args.out, args.pretrain_iterations)
    else:
        variants = list(VARIANTS)
    runs = [
        run(variant, seed, args.out, args.opts, not args.no_train)
        for seed in args.seeds
        for variant in variants
    ]
    runs = [r for r in runs if r is not None]
    # The same for every seed of a variant (one fixed batch): measured once per variant.
    memory = {}
    for r in runs:
        variant = next(v for v in variants if v.name == r["variant"])
        if variant.name not in memory:
            memory[variant.name] = step_memory(variant.config, [*variant.opts, *args.opts])
        r["mib_per_image"] = memory[variant.name]
    text = table(runs, variants)
    info = {"experiment": args.experiment, "machine": machine(), "runs": runs}
    info["variants"] = [v._asdict() for v in variants]
    write_results(args.out, text + "\n", info)
    print(text)
    return runs


if __name__ == "__main__":
    main()
