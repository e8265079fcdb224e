#!/usr/bin/env python
"""Global attention with ViTDet's decomposed relative positions: exact methods side by side.

One global-attention block's attention (ViT-B: 12 heads of 64 channels) on a square token grid,
batch 1, fp32, on CPU: forward + backward, forward alone (what the reversible and checkpoint
modes run once more in backward), and the peak of forward + backward (exact tensor tracker;
inputs not counted). All four give the same output (the largest difference to "explicit" is
printed):

* ``fold``: rev_det's :func:`rev_det.modeling.attention.attention_with_rel_pos` with
  ``fold=True`` (the bias folded into q and k; fused SDPA, no N x N tensor);
* ``mask``: the same function with ``fold=False`` (SDPA with the bias materialised as an
  N x N mask);
* ``explicit``: softmax(q k^T / sqrt(d) + bias) v, as ViTDet computes it;
* ``tiled``: query tiles through SDPA, the bias of each tile added as its mask, each tile one
  recomputed unit (``torch.utils.checkpoint``): memory tile x N.

Usage: ``python tools/attention_speed.py --grid 64 --out benchmarks/attention_speed_cpu``
(64 x 64 tokens: a 1024 x 1024 image at patch size 16).
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rev_det.modeling.attention import attention_with_rel_pos, full_rel_pos_bias, rel_pos_bias
from rev_det.utils import MemoryTracker, MiB, git_commit, machine

HEADS, HEAD_DIM = 12, 64


def methods(grid, rel_pos_h, rel_pos_w, tile):
    hw = (grid, grid)

    def fold(q, k, v):
        return attention_with_rel_pos(q, k, v, hw, hw, rel_pos_h, rel_pos_w, fold=True)

    def mask(q, k, v):
        return attention_with_rel_pos(q, k, v, hw, hw, rel_pos_h, rel_pos_w, fold=False)

    def explicit(q, k, v):
        bias = full_rel_pos_bias(*rel_pos_bias(q, hw, hw, rel_pos_h, rel_pos_w))
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
        return scores.softmax(-1) @ v

    def tiled(q, k, v):
        bias_h, bias_w = rel_pos_bias(q, hw, hw, rel_pos_h, rel_pos_w)

        def one_tile(q_tile, bias_h_tile, bias_w_tile):
            attn_mask = full_rel_pos_bias(bias_h_tile, bias_w_tile)
            return F.scaled_dot_product_attention(q_tile, k, v, attn_mask=attn_mask)

        tiles = [
            checkpoint(
                one_tile,
                q[:, :, s : s + tile],
                bias_h[:, :, s : s + tile],
                bias_w[:, :, s : s + tile],
                use_reentrant=False,
            )
            for s in range(0, q.shape[2], tile)
        ]
        return torch.cat(tiles, dim=2)

    return {"fold": fold, "mask": mask, "explicit": explicit, "tiled": tiled}


def measure(fn, inputs, params, repeats):
    def backward_once():
        fn(*inputs).sum().backward()
        for t in (*inputs, *params):
            t.grad = None

    with MemoryTracker() as mem:
        backward_once()  # also the warm-up
    fwd_bwd, fwd = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        backward_once()
        fwd_bwd.append(time.perf_counter() - start)
        with torch.no_grad():
            start = time.perf_counter()
            fn(*inputs)
            fwd.append(time.perf_counter() - start)
    return statistics.median(fwd_bwd), statistics.median(fwd), mem.peak / MiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, default=64, help="tokens per side (default 64)")
    parser.add_argument("--tile", type=int, default=512, help="queries per tile (default 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default="", help="folder for results_<grid>x<grid>.md (default: print only)"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    n = args.grid * args.grid
    q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=True) for _ in range(3))
    rel_pos_h, rel_pos_w = (
        (0.02 * torch.randn(2 * args.grid - 1, HEAD_DIM)).requires_grad_() for _ in range(2)
    )
    fns = methods(args.grid, rel_pos_h, rel_pos_w, args.tile)
    with torch.no_grad():
        reference = fns["explicit"](q, k, v)
    rows = []
    for name, fn in fns.items():
        with torch.no_grad():
            diff = (fn(q, k, v) - reference).abs().max().item()
        fwd_bwd, fwd, peak = measure(fn, (q, k, v), (rel_pos_h, rel_pos_w), args.repeats)
        rows.append((name, fwd_bwd, fwd, fwd_bwd + fwd, peak, diff))
        print(f"{name}: fwd+bwd {fwd_bwd:.2f} s, fwd {fwd:.2f} s, {peak:.1f} MiB, diff {diff:.1e}")

    lines = [
        f"# Global attention with relative positions, {args.grid}x{args.grid} tokens",
        "",
        f"- machine: {machine()}; torch {torch.__version__}; rev_det {git_commit()}; fp32, "
        f"batch 1, {HEADS} heads of {HEAD_DIM}; tile {args.tile} queries",
        f"- command: `python tools/attention_speed.py --grid {args.grid} --tile {args.tile} "
        f"--repeats {args.repeats}{' --out ' + args.out if args.out else ''}`",
        "- times: median of the repeats after a warm-up; recomputed = fwd+bwd + fwd (what a "
        "block costs in the reversible and checkpoint modes); peak of forward + backward, exact "
        "tracker, inputs not counted; diff = largest difference of the output to explicit",
        "",
        "| method | fwd+bwd (s) | fwd (s) | recomputed (s) | peak (MiB) | diff |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.1f} | {r[5]:.1e} |" for r in rows
    ]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"results_{args.grid}x{args.grid}.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
