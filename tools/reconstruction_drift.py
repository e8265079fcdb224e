#!/usr/bin/env python
"""Reconstruction drift of the reversible backward: rebuilt block inputs against the true ones.

The reversible backward rebuilds each block's input from its output, ``X2 = Y2 - G(Y1)``,
``X1 = Y1 - F(X2)``. In exact arithmetic that is the input; in floating point it is off by
rounding, and the error of one block's rebuilt input feeds the rebuilding of the block before
it. This tool measures that drift with the engine's own steps
(:func:`rev_det.reversible.measure_reconstruction`): RevViT trunks at ViT-B width (768
channels, 12 heads, MLP ratio 4, global attention, no drop path) of each ``--depths``, one
random image at ``--size``, in fp32 and under bf16 and fp16 autocast (the streams stay fp32,
F and G run in the autocast dtype, as in training). Per block it reports the max and the mean
relative error of the rebuilt input over both streams, ``max |X' - X| / max |X|`` and
``mean |X' - X| / mean |X|``; block 0 has been rebuilt through every block of the trunk.

Weights (``--scales``): 1 is the trunk as initialised for training (ViTDet's truncated normal,
std 0.02); a scale s multiplies every weight matrix of the blocks by s, a stress test standing in
for trained weights, whose blocks can amplify perturbations more than freshly initialised ones
(the drift grows steeply with it).

Output in ``--out``: ``results.md`` (tables, machine, torch version, the command),
``results.json`` and ``drift.png`` (max relative error against block index).

Example::

    nice -n 15 python tools/reconstruction_drift.py --out benchmarks/reconstruction_drift
"""

import argparse
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rev_det.modeling.attention import resize_abs_pos  # noqa: E402
from rev_det.modeling.rev_vit import RevViT  # noqa: E402
from rev_det.reversible import measure_reconstruction  # noqa: E402
from rev_det.utils import machine, write_results  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def label(scale: float) -> str:
    return "init" if scale == 1 else f"init x{scale:g}"


def build_trunk(depth: int, scale: float, size: int, seed: int) -> RevViT:
    torch.manual_seed(seed)
    trunk = RevViT(
        img_size=size,
        embed_dim=768,
        depth=depth,
        num_heads=12,
        drop_path_rate=0.0,
        use_rel_pos=True,
        pretrain_img_size=224,
    )
    if scale != 1:
        with torch.no_grad():
            for name, p in trunk.blocks.named_parameters():
                if p.dim() == 2 and "rel_pos" not in name:
                    p.mul_(scale)
    return trunk.eval()


@torch.no_grad()
def drift(trunk: RevViT, image: torch.Tensor, precision: str) -> torch.Tensor:
    """Per block (max, mean) relative error of the rebuilt input, as in training's backward."""
    dtype = PRECISIONS[precision]
    with torch.autocast(image.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        x = trunk.patch_embed(image)
        x = x + resize_abs_pos(trunk.pos_embed, trunk.pretrain_use_cls_token, x.shape[1:3])
        return measure_reconstruction(list(trunk.blocks), x, x).cpu()


def report(args, results) -> str:
    md = [
        "# Reconstruction drift of the reversible backward",
        "",
        f"- machine: {results['machine']}; torch {results['torch']}; {results['seconds']:.0f} s",
        f"- command: `{results['command']}`",
        f"- RevViT at ViT-B width (768 channels, 12 heads, MLP 4x, global attention, no drop "
        f"path), {args.batch} random N(0, 1) image(s) at {args.size}x{args.size} "
        f"({(args.size // 16) ** 2} tokens), seed {args.seed}; streams in fp32, F and G in the "
        "autocast dtype",
        "- error of block i's rebuilt input X' (both streams) against the true X: max = "
        "max|X' - X| / max|X|, mean = mean|X' - X| / mean|X|; block 0 is rebuilt through every "
        "block",
        "- weights: init = as initialised for training (std 0.02); init xS = every weight "
        "matrix of the blocks multiplied by S (a stress test standing in for trained weights)",
        "",
    ]
    for scale in args.scales:
        variant = label(scale)
        md += [
            f"## Weights: {variant}",
            "",
            "Block 0 (rebuilt through the whole trunk), max / mean relative error; and the "
            "largest max error over all blocks:",
            "",
            "| depth | " + " | ".join(f"{p} block 0" for p in args.precisions) + " | "
            + " | ".join(f"{p} worst" for p in args.precisions) + " |",
            "|---|" + "---|" * (2 * len(args.precisions)),
        ]  # fmt: skip
        for depth in args.depths:
            cells = []
            for p in args.precisions:
                errors = results["drift"][variant][str(depth)][p]
                cells.append(f"{errors[0][0]:.1e} / {errors[0][1]:.1e}")
            for p in args.precisions:
                errors = results["drift"][variant][str(depth)][p]
                cells.append(f"{max(e[0] for e in errors):.1e}")
            md.append(f"| {depth} | " + " | ".join(cells) + " |")
        md.append("")
    md += ["![max relative error against block index](drift.png)", ""]
    return "\n".join(md)


def plot(args, results, path):
    fig, axes = plt.subplots(
        1, len(args.scales), figsize=(6 * len(args.scales), 4.5), squeeze=False, sharey=True
    )
    colors = {"fp32": "tab:blue", "bf16": "tab:red", "fp16": "tab:green"}
    styles = ["-", "--", ":", "-."]
    for ax, scale in zip(axes[0], args.scales):
        variant = label(scale)
        for i, depth in enumerate(args.depths):
            for p in args.precisions:
                errors = results["drift"][variant][str(depth)][p]
                ax.semilogy(
                    range(len(errors)),
                    [max(e[0], 1e-12) for e in errors],
                    styles[i % len(styles)],
                    color=colors.get(p),
                    label=f"{p}, depth {depth}",
                )
        ax.set_title(f"weights: {variant}")
        ax.set_xlabel("block index (0 = rebuilt through the whole trunk)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("max relative error of the rebuilt input")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument(
        "--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16", "fp16"]
    )
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[1.0, 2.0, 3.0], help="weight factors"
    )
    parser.add_argument("--size", type=int, default=224, help="image size (a multiple of 16)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/reconstruction_drift")
    args = parser.parse_args(argv)
    if args.size % 16:
        parser.error(f"--size {args.size} is not a multiple of the patch size 16.")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    generator = torch.Generator().manual_seed(args.seed)
    image = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
    image = image.to(args.device)
    results = {"drift": {}}
    for scale in args.scales:
        variant = label(scale)
        results["drift"][variant] = {}
        for depth in args.depths:
            trunk = build_trunk(depth, scale, args.size, args.seed).to(args.device)
            per_precision = {}
            for p in args.precisions:
                per_precision[p] = drift(trunk, image, p).tolist()
                print(
                    f"{variant:9s} depth {depth:3d} {p}: block 0 max {per_precision[p][0][0]:.2e}"
                    f" mean {per_precision[p][0][1]:.2e}",
                    flush=True,
                )
            results["drift"][variant][str(depth)] = per_precision
    results.update(
        machine=machine(),
        torch=torch.__version__,
        command="python " + " ".join(sys.argv),
        seconds=time.time() - start,
        args=vars(args),
    )
    text = report(args, results)
    write_results(args.out, text, results)
    plot(args, results, os.path.join(args.out, "drift.png"))
    print(text)


if __name__ == "__main__":
    main()
