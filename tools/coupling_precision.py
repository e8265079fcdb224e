#!/usr/bin/env python
"""Precision of RevViTDet's scaled coupling against (alpha, beta) and depth.

RevViTDet's blocks compute ``r = beta p + alpha q + A(q)``, ``s = beta q + alpha r + M(r)``;
the reversible backward rebuilds ``q = (s - alpha r - M(r)) / beta`` and then ``p``. Rounding
errors are divided by ``beta`` and mixed in through ``alpha`` at every step, so the rebuilt
inputs (and the gradients computed from them) drift more the further (alpha, beta) is from
RevViT's (0, 1) and the deeper the trunk. This tool measures, for each (alpha, beta) of
``--points``:

* rebuild error: block i's input rebuilt from the trunk's output by the backward's own steps
  against the true input, ``max |X' - X| / max |X|`` over both streams
  (:func:`rev_det.reversible.measure_reconstruction`); block 0 has been rebuilt through every
  block, block ``depth - k`` through k blocks, so one run gives the error against depth;
* gradient error: every parameter's gradient with ``backprop="reversible"`` against
  ``"autograd"``'s, ``max |g_rev - g| / max |g|``, the largest over the parameters (the measure
  the project's float32 tolerance of 1e-4 is stated in).

RevViTDet of ``--sizes`` (ViTDet's B / L: width, depth, heads, window blocks), one random image
at ``--image`` pixels, float32, no drop path, loss ``sum(out * w)`` with a fixed random ``w``.
Weights: ViT's initialisation (std 0.02); ``--scales`` S multiplies every weight matrix of the
blocks by S, a stress test standing in for pretrained weights, whose blocks amplify
perturbations more.

Output in ``--out``: ``results.md``, ``results.json`` and ``precision.png``.

Example::

    nice -n 15 python tools/coupling_precision.py --out benchmarks/coupling_precision
"""

import argparse
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rev_det.modeling import REVVIT_SIZES, RevViTDet  # noqa: E402
from rev_det.modeling.attention import resize_abs_pos  # noqa: E402
from rev_det.reversible import measure_reconstruction  # noqa: E402
from rev_det.utils import machine, write_results  # noqa: E402

# (alpha, beta): the linear schedule's path from ViT (1, 0) to RevViT (0, 1), finer near its
# end, then beta alone and alpha alone.
POINTS = [
    (0.9, 0.1),
    (0.75, 0.25),
    (0.5, 0.5),
    (0.25, 0.75),
    (0.1, 0.9),
    (0.05, 0.95),
    (0.02, 0.98),
    (0.0, 1.0),
    (0.0, 0.9),
    (0.1, 1.0),
]


def build_trunk(size: str, image: int, scale: float, seed: int) -> RevViTDet:
    torch.manual_seed(seed)
    shape = dict(REVVIT_SIZES[size], drop_path_rate=0.0)
    trunk = RevViTDet(img_size=image, window_size=14, use_rel_pos=True, **shape)
    if scale != 1:
        with torch.no_grad():
            for name, p in trunk.blocks.named_parameters():
                if p.dim() == 2 and "rel_pos" not in name:
                    p.mul_(scale)
    return trunk


def set_coupling(trunk: RevViTDet, alpha: float, beta: float):
    for coupling in trunk.couplings():
        coupling.set(alpha, beta)


def rebuild_errors(trunk: RevViTDet, image: torch.Tensor) -> list:
    """Per block, the max relative error of its rebuilt input (row 0: through every block)."""
    with torch.no_grad():
        x = trunk.patch_embed(image)
        x = x + resize_abs_pos(trunk.pos_embed, trunk.pretrain_use_cls_token, x.shape[1:3])
        return measure_reconstruction(list(trunk.blocks), x, x)[:, 0].tolist()


def gradients(trunk: RevViTDet, image: torch.Tensor, weight: torch.Tensor, mode: str) -> list:
    trunk.train()
    trunk.backprop = mode
    trunk.zero_grad(set_to_none=True)
    (trunk(image)["last_feat"] * weight).sum().backward()
    return [p.grad.clone() for p in trunk.parameters() if p.grad is not None]


def gradient_error(trunk: RevViTDet, image: torch.Tensor, weight: torch.Tensor) -> float:
    """The largest ``max |g_rev - g| / max |g|`` over the parameters."""
    reference = gradients(trunk, image, weight, "autograd")
    trunk.reversible_at = (float("inf"), float("-inf"))  # rebuild at any coefficients here
    reversible = gradients(trunk, image, weight, "reversible")
    return max(
        ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        for g, r in zip(reversible, reference)
    )


def measure(trunk: RevViTDet, image: torch.Tensor, alpha: float, beta: float, grads: bool):
    """Rebuild errors per block and (with ``grads``) the gradient error at (alpha, beta)."""
    set_coupling(trunk, alpha, beta)
    row = {"alpha": alpha, "beta": beta, "rebuild": rebuild_errors(trunk.eval(), image)}
    if grads:
        channels = trunk.output_shape()["last_feat"].channels
        side = image.shape[-1] // trunk.patch_size
        weight = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(1))
        row["grad"] = gradient_error(trunk, image, weight.to(image))
    return row


def report(args, results) -> str:
    md = [
        "# Precision of RevViTDet's scaled coupling",
        "",
        f"- machine: {results['machine']}; torch {results['torch']}; {results['seconds']:.0f} s",
        f"- command: `{results['command']}`",
        f"- RevViTDet (ViTDet's layout, no drop path), one random N(0, 1) image at "
        f"{args.image}x{args.image}, float32, seed {args.seed}",
        "- rebuild: max|X' - X| / max|X| of a block input rebuilt through k blocks; grad: the "
        "largest max|g_rev - g| / max|g| over the parameters, reversible against autograd",
        "- weights: init = as initialised for training (std 0.02); init xS = every weight "
        "matrix of the blocks multiplied by S (a stress test standing in for pretrained weights)",
        "",
    ]
    for key, rows in results["points"].items():
        depth = len(rows[0]["rebuild"])
        ks = sorted({1, depth // 4, depth // 2, depth} - {0})
        md += [
            f"## {key}",
            "",
            "| alpha | beta | " + " | ".join(f"rebuild, {k} blocks" for k in ks)
            + " | grad error |",
            "|---|---|" + "---|" * (len(ks) + 1),
        ]  # fmt: skip
        for row in rows:
            cells = [f"{row['rebuild'][depth - k]:.1e}" for k in ks]
            grad = f"{row['grad']:.1e}" if "grad" in row else "not measured"
            md.append(
                f"| {row['alpha']:g} | {row['beta']:g} | " + " | ".join(cells) + f" | {grad} |"
            )
        md.append("")
    md += ["![rebuild error against depth](precision.png)", ""]
    return "\n".join(md)


def plot(results, path):
    keys = list(results["points"])
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for row in results["points"][key]:
            errors = row["rebuild"][::-1]  # index k - 1: rebuilt through k blocks
            ax.semilogy(
                range(1, len(errors) + 1),
                [max(e, 1e-12) for e in errors],
                marker=".",
                label=f"alpha {row['alpha']:g}, beta {row['beta']:g}",
            )
        ax.axhline(1e-4, color="k", lw=0.8, ls=":")
        ax.set_title(key)
        ax.set_xlabel("blocks rebuilt through")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("max relative error of the rebuilt input")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=sorted(REVVIT_SIZES), default=["B", "L"])
    parser.add_argument("--image", type=int, default=1024, help="image size (multiple of 16)")
    parser.add_argument(
        "--points",
        type=lambda s: tuple(map(float, s.split(","))),
        nargs="+",
        default=POINTS,
        help="(alpha, beta) pairs as alpha,beta",
    )
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument(
        "--grad-sizes",
        nargs="*",
        default=["B"],
        help="sizes whose gradient error is measured too (a reversible and an autograd step)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/coupling_precision")
    args = parser.parse_args(argv)
    if args.image % 16:
        parser.error(f"--image {args.image} is not a multiple of the patch size 16.")
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    image = torch.randn(1, 3, args.image, args.image, generator=torch.Generator().manual_seed(0))
    image = image.to(args.device)
    results = {"points": {}}
    for size in args.sizes:
        for scale in args.scales:
            key = f"ViT-{size}, weights " + ("init" if scale == 1 else f"init x{scale:g}")
            trunk = build_trunk(size, args.image, scale, args.seed).to(args.device)
            rows = []
            for alpha, beta in args.points:
                rows.append(measure(trunk, image, alpha, beta, size in args.grad_sizes))
                print(
                    f"{key}: alpha {alpha:g} beta {beta:g}: rebuild (all blocks) "
                    f"{rows[-1]['rebuild'][0]:.2e}, grad {rows[-1].get('grad', float('nan')):.2e}",
                    flush=True,
                )
            results["points"][key] = rows
            # Written after each trunk, so that a long run's finished part is kept.
            results.update(
                machine=machine(),
                torch=torch.__version__,
                command="python " + " ".join(sys.argv),
                seconds=time.time() - start,
                args={k: v for k, v in vars(args).items() if k != "points"},
                requested_points=[list(p) for p in args.points],
            )
            write_results(args.out, report(args, results), results)
            plot(results, f"{args.out}/precision.png")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
