"""The depth section: memory against depth at fixed width, the RevViT trunk alone or the full
Mask R-CNN step, and the slope per block of each mode."""

import os
from functools import partial
from typing import List

import torch

from rev_det.modeling import RevViT, vit_trunk_args

from ..detectors import MODES, Detection, backbone_forward, window_blocks_at
from ..measure import Row, budgeted, measure, param_mib
from ..report import label, markdown_section, plot, series
from .section import Section

__all__ = ["DEPTH", "depth_fits", "trunk_model"]


def trunk_model(det: Detection, depth: int, backprop: str) -> RevViT:
    """A RevViT trunk of the configured width and attention layout, with ``depth`` blocks."""
    c = vit_trunk_args(det.cfg(backprop, "reversible"))
    return RevViT(
        img_size=det.options.size,
        embed_dim=c["embed_dim"],
        depth=depth,
        num_heads=c["num_heads"],
        use_rel_pos=c["use_rel_pos"],
        window_size=c["window_size"],
        window_block_indexes=window_blocks_at(depth, c),
        pretrain_img_size=c["pretrain_img_size"],
        backprop=backprop,
    ).to(det.options.device)


def _run(options, results, det: Detection):
    if not det.vit:
        raise SystemExit("--sections depth is implemented for RevViT backbones only.")
    rows = []
    if options.depth_scope == "step":
        for backprop, pyramid in det.runs():
            for depth in sorted(options.depths):
                row = dict(det.step(backprop, pyramid, options.size, depth, backbone=False))
                # The depth table's columns are the step's.
                for key in ("peak", "predicted_peak", "activations", "stored"):
                    row[key] = row.get(f"step_{key}")
                rows.append(row)
    else:
        for mode in MODES:
            for depth in sorted(options.depths):
                torch.manual_seed(0)
                model = trunk_model(det, depth, mode).train()
                images = torch.randn(
                    options.batch, 3, options.size, options.size, device=options.device
                )
                row = dict(backprop=mode, pyramid="none", depth=depth, params=param_mib(model))
                forward = backbone_forward(model, images, options.amp)
                run = partial(measure, forward, model.parameters(), options.device)
                points = [(("trunk", mode, options.size), depth)]
                what = f"trunk {mode} depth {depth}"
                row.update(budgeted(det.budget, points, row["params"], what, run))
                if row["measured"]:
                    print(f"  trunk {mode:10s} depth {depth:3d}: {row['activations']:9.1f} MiB")
                rows.append(row)
    results["depth"] = rows


def depth_fits(rows: List[Row], key: str, target_depth: int) -> List[str]:
    """Per series: slope per block between consecutive depths and the line to ``target_depth``."""
    notes = []
    for group in series(rows, ("backprop", "pyramid")):
        pts = [(r["depth"], r[key]) for r in group if r["measured"]]
        if len(pts) < 2:
            continue
        slopes = [(m1 - m0) / (d1 - d0) for (d0, m0), (d1, m1) in zip(pts, pts[1:])]
        (d0, m0), (d1, m1) = pts[0], pts[-1]
        text = (
            f"{label(group[0])}: {', '.join(f'{s:.2f}' for s in slopes)} MiB per block between "
            f"consecutive depths; depth {d1} / depth {d0} = {m1 / m0:.3f}x"
        )
        if target_depth > d1:
            line = pts[-1][1] + slopes[-1] * (target_depth - d1)
            text += (
                f"; the line through the last two reaches {line:.1f} MiB at depth {target_depth}"
            )
        notes.append(text)
    return notes


def _report(options, results) -> List[str]:
    rows = results["depth"]
    trunk = options.depth_scope == "trunk"
    key = "activations" if trunk else "peak"
    notes = depth_fits(rows, key, results["model_depth"])
    ylabel = "trunk activations (MiB)" if trunk else "training-step peak (MiB)"
    path = os.path.join(options.out, "memory_vs_depth.png")
    notes.append(plot(rows, "depth", key, ("backprop", "pyramid"), ("depth", ylabel), path))
    scope = "RevViT trunk alone" if trunk else "full Mask R-CNN step"
    title = f"Memory against depth ({scope}, {options.size}x{options.size})"
    columns = ["backprop", "pyramid", "depth", "params", "peak", "activations", "stored"]
    return markdown_section(title, rows, columns, notes)


DEPTH = Section(
    name="depth",
    what="Memory against depth at fixed width (``--depths``) and the slope per block, per mode. "
    "``--depth-scope trunk`` measures the RevViT trunk alone (activations only); "
    "``--depth-scope step`` the full Mask R-CNN step of a RevViT detector of that depth (its "
    "global-attention blocks evenly spaced as in the configured model), for every pair of the "
    "detection section (or those of ``--pairs``).",
    run=_run,
    report=_report,
)
