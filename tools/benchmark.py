#!/usr/bin/env python
"""Memory and speed of rev_det's backbones, every backprop mode side by side in one run.

Sections (``--sections``):

* ``detection``: peak memory of one full Mask R-CNN training step (forward, losses, backward)
  and of the backbone + pyramid alone, for each (backprop, pyramid) pair, split into
  parameter gradients and activations (everything else). Parameters are listed apart.
* ``depth``: activation memory of the trunk alone against depth at fixed width, and the slope
  per block, per mode.
* ``resolution``: full-step peak memory against input size, per mode.
* ``classification``: the paper's setting: per-image training memory of ViT-B/L-sized trunks
  with a classification head at 224x224.
* ``speed`` (CUDA only): step time (CUDA events, warm-up, median), images per second at equal
  batch, the largest batch that fits per mode (doubling, then bisection) and images per
  second there.

On CPU memory is measured exactly with :class:`rev_det.utils.MemoryTracker`; on CUDA with
``torch.cuda.max_memory_allocated`` after a reset. Times are only compared as ratios within a
run. Results go to ``--out`` as ``results.md``, ``results.json`` and PNG plots, with the
machine, the torch version and the exact command.

Example::

    python tools/benchmark.py --backbone rev_vit_b --size 1024 --batch 1
    python tools/benchmark.py --backbone rev_vit_l --size 1024 --sections detection
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from torch import nn  # noqa: E402

import rev_det  # noqa: E402
from rev_det.modeling import RevViT, set_backprop  # noqa: E402
from rev_det.utils import MemoryTracker, MiB  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONES = {
    name: os.path.join(ROOT, "configs", "COCO", f"mask_rcnn_{name}.yaml")
    for name in ("rev_vit_b", "rev_vit_l", "rev_vit_h", "rev_mvit_t", "rev_mvit_s", "rev_mvit_b")
}
# (backprop, pyramid): the baselines use ViTDet's SimpleFeaturePyramid; "autograd" with the
# reversible pyramid is the same architecture as "reversible" with stored activations.
DETECTION_RUNS = (
    ("autograd", "simple"),
    ("checkpoint", "simple"),
    ("autograd", "reversible"),
    ("checkpoint", "reversible"),
    ("reversible", "reversible"),
)
MODES = ("autograd", "checkpoint", "reversible")
CLASSIFIERS = {"vit_b": (768, 12, 12), "vit_l": (1024, 24, 16)}


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores)"


def detection_cfg(args, backprop, pyramid, device):
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(BACKBONES[args.backbone])
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.REV.BACKPROP = backprop
    cfg.MODEL.REV.PYRAMID = pyramid
    return cfg


def synthetic_batch(size, batch, num_classes, device):
    """Images with a few boxes and masks each, so that every head produces losses."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        inst = Instances((size, size))
        boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8], [0.2, 0.5, 0.4, 0.9]])
        inst.gt_boxes = Boxes(boxes * size)
        inst.gt_classes = torch.randint(0, num_classes, (3,), generator=g)
        masks = torch.zeros(3, size, size, dtype=torch.bool)
        for m, (x0, y0, x1, y1) in zip(masks, (boxes * size).long().tolist()):
            m[y0:y1, x0:x1] = True
        inst.gt_masks = BitMasks(masks)
        image = torch.randint(0, 255, (3, size, size), generator=g, dtype=torch.uint8)
        out.append({"image": image.to(device), "instances": inst.to(device)})
    return out


def param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(step, params, device):
    """Peak memory of ``step()``: total, activations and parameter gradients, in MiB."""
    model_params = list(params)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        grads = sum(
            p.grad.numel() * p.grad.element_size() for p in model_params if p.grad is not None
        )
        peak = torch.cuda.max_memory_allocated() - base
        return {"peak": peak / MiB, "grads": grads / MiB, "activations": (peak - grads) / MiB}
    with MemoryTracker(grads_of=model_params) as mem:
        step()
    return {
        "peak": mem.peak / MiB,
        "grads": mem.grads / MiB,
        "activations": mem.activation_peak / MiB,
    }


def detection_step(model, batch, amp):
    def step():
        model.zero_grad(set_to_none=True)
        with EventStorage(), torch.autocast(model.device.type, torch.bfloat16, enabled=amp):
            losses = model(batch)
        sum(losses.values()).backward()

    return step


def backbone_step(backbone, images, amp):
    def step():
        backbone.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            features = backbone(images)
        sum(f.float().mean() for f in features.values()).backward()

    return step


def run_detection(args, results):
    rows = []
    for backprop, pyramid in DETECTION_RUNS:
        torch.manual_seed(0)
        cfg = detection_cfg(args, backprop, pyramid, args.device)
        model = build_model(cfg).train()
        batch = synthetic_batch(args.size, args.batch, cfg.MODEL.ROI_HEADS.NUM_CLASSES, args.device)
        full = measure(detection_step(model, batch, args.amp), model.parameters(), args.device)
        images = model.preprocess_image(batch).tensor
        trunk = measure(
            backbone_step(model.backbone, images, args.amp),
            model.backbone.parameters(),
            args.device,
        )
        row = dict(backprop=backprop, pyramid=pyramid, params=param_bytes(model) / MiB)
        row.update({f"step_{k}": v for k, v in full.items()})
        row.update({f"backbone_{k}": v for k, v in trunk.items()})
        rows.append(row)
        print(
            f"  detection {backprop:10s} {pyramid:10s} step peak {full['peak']:9.1f} MiB",
            flush=True,
        )
        del model
    results["detection"] = rows


def trunk_model(args, depth, backprop):
    cfg = detection_cfg(args, backprop, "reversible", "meta")
    if not args.backbone.startswith("rev_vit"):
        raise SystemExit("--sections depth is implemented for RevViT trunks")
    c = cfg.MODEL.REVVIT
    every = max(1, c.DEPTH // max(1, c.DEPTH - len(c.WINDOW_BLOCK_INDEXES)))
    return RevViT(
        img_size=args.size,
        embed_dim=c.EMBED_DIM,
        depth=depth,
        num_heads=c.NUM_HEADS,
        use_rel_pos=True,
        window_size=c.WINDOW_SIZE,
        window_block_indexes=[i for i in range(depth) if i % every != every - 1],
        pretrain_img_size=224,
        backprop=backprop,
    ).to(args.device)


def run_depth(args, results):
    rows = []
    for mode in MODES:
        for depth in args.depths:
            torch.manual_seed(0)
            model = trunk_model(args, depth, mode).train()
            images = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
            mem = measure(backbone_step(model, images, args.amp), model.parameters(), args.device)
            rows.append(dict(backprop=mode, depth=depth, **mem))
            print(
                f"  depth {mode:10s} {depth:3d} activations {mem['activations']:9.1f} MiB",
                flush=True,
            )
    results["depth"] = rows


def run_resolution(args, results):
    rows = []
    for backprop, pyramid in (
        ("autograd", "simple"),
        ("checkpoint", "simple"),
        ("reversible", "reversible"),
    ):
        for size in args.sizes:
            torch.manual_seed(0)
            cfg = detection_cfg(args, backprop, pyramid, args.device)
            model = build_model(cfg).train()
            batch = synthetic_batch(size, args.batch, cfg.MODEL.ROI_HEADS.NUM_CLASSES, args.device)
            mem = measure(detection_step(model, batch, args.amp), model.parameters(), args.device)
            rows.append(dict(backprop=backprop, pyramid=pyramid, size=size, **mem))
            print(f"  resolution {backprop:10s} {size:5d} peak {mem['peak']:9.1f} MiB", flush=True)
    results["resolution"] = rows


class Classifier(nn.Module):
    """A RevViT trunk at 224 with global average pooling and a linear head (the paper's setting)."""

    def __init__(self, embed_dim, depth, heads, backprop, num_classes=1000):
        super().__init__()
        self.net = RevViT(
            img_size=224, embed_dim=embed_dim, depth=depth, num_heads=heads, drop_path_rate=0.1,
            pretrain_img_size=224, backprop=backprop,
        )  # fmt: skip
        self.head = nn.Linear(2 * embed_dim, num_classes)

    def forward(self, x):
        return self.head(self.net(x)["last_feat"].mean(dim=(2, 3)))


def classification_step(model, images, labels, amp):
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()

    return step


def run_classification(args, results):
    rows = []
    for name in args.classifiers:
        for mode in MODES:
            torch.manual_seed(0)
            model = Classifier(*CLASSIFIERS[name], backprop=mode).to(args.device).train()
            images = torch.randn(args.cls_batch, 3, 224, 224, device=args.device)
            labels = torch.randint(0, 1000, (args.cls_batch,), device=args.device)
            mem = measure(
                classification_step(model, images, labels, args.amp),
                model.parameters(),
                args.device,
            )
            per_image = mem["activations"] / args.cls_batch
            rows.append(
                dict(
                    model=name, backprop=mode, batch=args.cls_batch, mib_per_image=per_image, **mem
                )
            )
            print(f"  classification {name} {mode:10s} {per_image:8.2f} MiB/image", flush=True)
    results["classification"] = rows


def time_step(step, warmup=3, repeats=10):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def fits(make_step, batch):
    try:
        make_step(batch)()
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def largest_batch(make_step, limit=4096):
    lo, hi = 0, 1
    while hi <= limit and fits(make_step, hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(make_step, mid) else (lo, mid)
    return lo


def run_speed(args, results):
    if args.device != "cuda":
        print("  speed: skipped (CUDA only)")
        return
    rows = []
    for backprop, pyramid in (
        ("autograd", "simple"),
        ("checkpoint", "simple"),
        ("reversible", "reversible"),
    ):
        torch.manual_seed(0)
        cfg = detection_cfg(args, backprop, pyramid, "cuda")
        model = build_model(cfg).train()

        def make_step(batch, model=model, cfg=cfg):
            data = synthetic_batch(args.size, batch, cfg.MODEL.ROI_HEADS.NUM_CLASSES, "cuda")
            return detection_step(model, data, args.amp)

        seconds = time_step(make_step(args.batch))
        best = largest_batch(make_step, limit=args.max_batch)
        best_seconds = time_step(make_step(best), warmup=1, repeats=3) if best else float("nan")
        rows.append(
            dict(
                backprop=backprop, pyramid=pyramid, batch=args.batch, step_s=seconds,
                images_per_s=args.batch / seconds, max_batch=best,
                images_per_s_at_max=best / best_seconds if best else 0.0,
            )
        )  # fmt: skip
        print(
            f"  speed {backprop:10s} {args.batch / seconds:7.2f} img/s, max batch {best}",
            flush=True,
        )
        del model
        torch.cuda.empty_cache()
    results["speed"] = rows


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(args, results):
    os.makedirs(args.out, exist_ok=True)
    md = [
        f"# Benchmark: {args.backbone}, {args.size}x{args.size}, batch {args.batch}",
        "",
        f"- machine: {results['machine']}",
        f"- torch {results['torch']}, dtype: {'bf16 autocast' if args.amp else 'fp32'}",
        f"- command: `{results['command']}`",
        "- memory in MiB; peak = activations + parameter gradients created by the step"
        " (parameters themselves are listed apart; optimizer state is not included)",
        "",
    ]
    if "detection" in results:
        rows = results["detection"]
        base = next(r for r in rows if r["backprop"] == "autograd" and r["pyramid"] == "simple")
        for r in rows:
            r["step_vs_autograd_simple"] = f"{base['step_peak'] / r['step_peak']:.2f}x"
        md += [
            "## One Mask R-CNN training step",
            "",
            table(rows, ["backprop", "pyramid", "params", "step_peak", "step_activations",
                         "step_grads", "backbone_peak", "backbone_activations",
                         "step_vs_autograd_simple"]),  # fmt: skip
            "",
        ]
    if "depth" in results:
        rows = results["depth"]
        md += [
            "## Trunk activation memory against depth",
            "",
            table(rows, ["backprop", "depth", "activations", "peak"]),
            "",
        ]
        for mode in MODES:
            pts = [(r["depth"], r["activations"]) for r in rows if r["backprop"] == mode]
            if len(pts) > 1:
                (d0, m0), (d1, m1) = pts[0], pts[-1]
                md.append(
                    f"- {mode}: {(m1 - m0) / (d1 - d0):.2f} MiB per block; depth {d1} / depth {d0}"
                    f" = {m1 / m0:.2f}x"
                )
        md.append("")
        plot(
            rows,
            "depth",
            "activations",
            "trunk activation memory (MiB)",
            os.path.join(args.out, "memory_vs_depth.png"),
        )
    if "resolution" in results:
        rows = results["resolution"]
        md += [
            "## Training-step memory against resolution",
            "",
            table(rows, ["backprop", "pyramid", "size", "peak", "activations"]),
            "",
        ]
        plot(
            rows,
            "size",
            "peak",
            "step peak memory (MiB)",
            os.path.join(args.out, "memory_vs_resolution.png"),
        )
    if "classification" in results:
        rows = results["classification"]
        md += [
            "## Classification at 224 (the paper's setting)",
            "",
            table(rows, ["model", "backprop", "batch", "mib_per_image"]),
            "",
        ]
        for name in args.classifiers:
            per = {r["backprop"]: r["mib_per_image"] for r in rows if r["model"] == name}
            md.append(
                f"- {name}: reversible uses {per['autograd'] / per['reversible']:.1f}x less activation memory per image than autograd"
            )
        md.append("")
    if "speed" in results:
        md += [
            "## Speed",
            "",
            table(
                results["speed"],
                [
                    "backprop",
                    "pyramid",
                    "batch",
                    "step_s",
                    "images_per_s",
                    "max_batch",
                    "images_per_s_at_max",
                ],
            ),
            "",
        ]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(md))


def plot(rows, x, y, ylabel, path):
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in MODES:
        pts = [(r[x], r[y]) for r in rows if r["backprop"] == mode]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", choices=sorted(BACKBONES), default="rev_vit_b")
    parser.add_argument("--size", type=int, default=1024, help="square input size of the detector")
    parser.add_argument("--batch", type=int, default=1, help="images per training step")
    parser.add_argument("--sections", nargs="+", default=["detection", "depth", "classification", "speed"],
                        choices=["detection", "depth", "resolution", "classification", "speed"])  # fmt: skip
    parser.add_argument("--depths", type=int, nargs="+", default=[6, 12, 24, 48])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768, 1024])
    parser.add_argument(
        "--classifiers", nargs="+", choices=sorted(CLASSIFIERS), default=["vit_b", "vit_l"]
    )
    parser.add_argument("--cls-batch", type=int, default=8, help="batch of the classification runs")
    parser.add_argument(
        "--max-batch", type=int, default=512, help="upper limit of the batch search"
    )
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (fp32 otherwise)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--opts", nargs="+", default=[], help="KEY VALUE config overrides")
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/<backbone>_<size>_<device>)"
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(ROOT, "benchmarks", f"{args.backbone}_{args.size}_{args.device}")
    return args


def main(argv=None):
    args = parse_args(argv)
    results = {
        "machine": machine(),
        "torch": torch.__version__,
        "command": " ".join(
            ["python", "tools/benchmark.py"] + (argv if argv is not None else sys.argv[1:])
        ),
        "args": vars(args),
    }
    start = time.time()
    for section in args.sections:
        print(f"[{section}]", flush=True)
        globals()[f"run_{section}"](args, results)
    results["seconds"] = time.time() - start
    write_report(args, results)
    return results


if __name__ == "__main__":
    main()
