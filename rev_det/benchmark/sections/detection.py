"""The detection and resolution sections: peak memory of one full Mask R-CNN training step per
(backprop, pyramid) pair, at ``--size`` and against the input size."""

import os
from typing import List

from ..detectors import Detection
from ..measure import Row
from ..report import markdown_section, plot
from .section import Section

__all__ = ["DETECTION", "RESOLUTION"]


def _peak(row: Row) -> float:
    """A detection row's step peak, measured or (for a skipped run) predicted."""
    return row["step_peak"] if row["measured"] else row["step_predicted_peak"]


def _run_detection(options, results, det: Detection):
    backbone = not options.step_only
    rows = [det.step(b, p, options.size, det.depth, backbone) for b, p in det.runs()]
    base = next((r for r in rows if (r["backprop"], r["pyramid"]) == det.pairs[0]), None)
    for r in rows:
        if base is not None:
            r["vs_baseline"] = _peak(base) / _peak(r)
            r["vs_predicted"] = not (base["measured"] and r["measured"])
    results["detection"] = rows


def _report_detection(options, results) -> List[str]:
    rows = results["detection"]
    columns = ["backprop", "pyramid", "params", "step_peak", "step_activations", "step_grads"]
    columns += ["step_stored"]
    notes = []
    if any("backbone_peak" in r for r in rows):
        columns += ["backbone_peak", "backbone_activations"]
    if any("vs_baseline" in r for r in rows):
        columns += ["vs_baseline"]
        notes.append("vs_baseline: the baseline's step peak over this row's")
    along = sorted({r["predicted_along"] for r in rows if not r["measured"]})
    if along:
        notes.append(
            "predicted: not measured (over --budget-gib); the step peak on the straight line "
            "through the last two measured points (through the origin from one) of the same "
            f"detector along {' and '.join(along)}; along depth this is exact for stored "
            "activations (see the depth section's slopes per block)"
        )
    title = f"One Mask R-CNN training step at {options.size}x{options.size}"
    return markdown_section(title, rows, columns, notes)


def _run_resolution(options, results, det: Detection):
    rows = []
    for backprop, pyramid in det.main_runs():
        for size in sorted(options.sizes):
            rows.append(det.step(backprop, pyramid, size, det.depth, backbone=False))
    results["resolution"] = rows


def _report_resolution(options, results) -> List[str]:
    rows = results["resolution"]
    path = os.path.join(options.out, "memory_vs_resolution.png")
    labels = ("input size (pixels, square)", "training-step peak (MiB)")
    notes = [plot(rows, "size", "step_peak", ("backprop", "pyramid"), labels, path)]
    for size in sorted(options.sizes):
        at = {r["backprop"]: r for r in rows if r["size"] == size and r["measured"]}
        if "autograd" in at and "reversible" in at:
            ratio = at["autograd"]["step_peak"] / at["reversible"]["step_peak"]
            notes.append(f"{size}: reversible step peak {ratio:.2f}x lower than the baseline's")
    columns = ["backprop", "pyramid", "size", "step_peak", "step_activations", "step_stored"]
    return markdown_section("Training-step memory against resolution", rows, columns, notes)


RESOLUTION = Section(
    name="resolution",
    what="Full-step peak memory against input size (``--sizes``) for the baseline, checkpoint "
    "and reversible detectors.",
    run=_run_resolution,
    report=_report_resolution,
)

DETECTION = Section(
    name="detection",
    what="Peak memory of one full Mask R-CNN training step (forward, losses, backward) at "
    "``--size`` and of the backbone + pyramid alone (unless ``--step-only``), for every "
    "(backprop, pyramid) pair (or those of ``--pairs``), split into parameter gradients and "
    "activations, and the memory kept between forward and backward.",
    run=_run_detection,
    report=_report_detection,
)
