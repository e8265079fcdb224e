"""The speed section: training-step time of Detectron2's own ViTDet and rev_det's baseline,
checkpoint and reversible detectors, interleaved, and on CUDA the largest batch of each."""

import os
import statistics
from typing import Callable, List, Optional, Tuple

import detectron2
import torch
from torch import nn

from rev_det.modeling import build_detector

from ..detectors import (
    Detection,
    detection_forward,
    saturating_objects,
    synthetic_batch,
    training_step,
)
from ..measure import (
    Row,
    interleaved_times,
    kernel_work,
    largest_batch,
    measure,
    paired_ratio,
)
from ..report import markdown_section, plot
from ..vitdet import HAS_VITDET, vitdet_detector
from .section import Section

__all__ = ["SPEED", "SpeedRun", "speed_runs"]

# The pyramid column of Detectron2's own ViTDet rows.
VITDET = "ViTDet (Detectron2)"


def speed_runs(runs: List[Tuple[str, str]], device: str) -> List[Tuple[str, str, bool]]:
    """(backprop, pyramid, parallel backward) of the speed section: the main runs, and on CUDA
    the reversible one again with the parallel (two CUDA streams) backward."""
    speed = [(backprop, pyramid, False) for backprop, pyramid in runs]
    if device == "cuda":
        speed += [(b, p, True) for b, p in runs if b == "reversible"]
    return speed


class SpeedRun:
    """One detector of the speed section and its training step at a given batch.

    Args:
        label: the backprop column of the tables ("reversible (parallel)", ...).
        pyramid: the pyramid column.
        model: the Mask R-CNN, in train mode on the benchmark's device.
        amp: whether its steps run under bf16 autocast.
    """

    def __init__(self, label: str, pyramid: str, model: nn.Module, amp: bool):
        self.label, self.pyramid, self.model, self.amp = label, pyramid, model, amp

    def forward(self, data: List[dict]) -> Callable[[], torch.Tensor]:
        return detection_forward(self.model, data, self.amp)

    def step(self, data: List[dict]) -> Callable[[], None]:
        return training_step(self.forward(data), self.model)


def _vitdet_runs(options, det: Detection) -> List[SpeedRun]:
    """ViTDet-B Mask R-CNN with autograd and with activation checkpointing: rev_det's detector
    (same RPN and heads) with its backbone replaced by Detectron2's own; empty on Detectron2
    v0.6 (a line says so)."""
    if not det.vit:
        return []
    if not HAS_VITDET:
        print(f"  speed: ViTDet skipped (Detectron2 {detectron2.__version__} has no ViT)")
        return []
    runs = []
    for backprop in ("autograd", "checkpoint"):
        torch.manual_seed(0)
        model = vitdet_detector(
            det.cfg("autograd", "simple"), backprop == "checkpoint", options.size
        )
        runs.append(SpeedRun(backprop, VITDET, model.train(), options.amp))
    return runs


def _vs_checkpointed_vitdet(rows: List[Row]) -> Optional[List[Row]]:
    """The rows with ``vs_vitdet_ckpt``: each step's time over ViTDet's with activation
    checkpointing, paired round by round (same batch); None where ViTDet was not run."""
    reference = {
        r["batch"]: r["times"]
        for r in rows
        if (r["backprop"], r["pyramid"]) == ("checkpoint", VITDET)
    }
    if not reference:
        return None
    return [
        (
            dict(r, vs_vitdet_ckpt=paired_ratio(r["times"], reference[r["batch"]]))
            if r["batch"] in reference
            else r
        )
        for r in rows
    ]


def _run(options, results, det: Detection):
    """Step times of the main detectors at each of ``--speed-batches``, interleaved (one step of
    each detector in turn, ``--repeats`` times, after ``--warmup`` steps of each, the first of
    which measures the step's peak memory), so that a machine that slows down or speeds up during
    the run slows every detector alike; on CUDA also the largest batch of each."""
    cfg = det.cfg("reversible", "reversible")
    num_classes, objects = cfg.MODEL.ROI_HEADS.NUM_CLASSES, saturating_objects(cfg)
    runs = _vitdet_runs(options, det) if options.vitdet else []
    for backprop, pyramid, parallel in speed_runs(det.main_runs(), options.device):
        torch.manual_seed(0)
        cfg = det.cfg(backprop, pyramid)
        cfg.MODEL.REV.PARALLEL_BACKWARD = parallel
        label = backprop + (" (parallel)" if parallel else "")
        runs.append(SpeedRun(label, pyramid, build_detector(cfg).train(), options.amp))
    # Filled in as measured, so that an interrupted run reports the batches it finished.
    rows = results["speed"] = []
    for batch in options.speed_batches:
        data = synthetic_batch(options.size, batch, num_classes, options.device, objects)
        steps, peaks = [], []
        for run in runs:
            peaks.append(measure(run.forward(data), run.model.parameters(), options.device)["peak"])
            steps.append(run.step(data))
            for _ in range(options.warmup - 1):
                steps[-1]()
        kernel = [[] for _ in runs]
        steps = [kernel_work(step, record) for step, record in zip(steps, kernel)]
        times = interleaved_times(steps, options.repeats, options.device)
        for run, peak, seconds, work in zip(runs, peaks, times, kernel):
            median, ratio = statistics.median(seconds), paired_ratio(seconds, times[0])
            faults, system = zip(*work)
            rows.append(
                dict(
                    backprop=run.label,
                    pyramid=run.pyramid,
                    batch=batch,
                    step_s=median,
                    images_per_s=batch / median,
                    vs_first=ratio,
                    peak=peak,
                    page_faults_k=statistics.median(faults) / 1000,
                    system_s=statistics.median(system),
                    times=seconds,
                    page_faults=list(faults),
                    system_times=list(system),
                )
            )
            print(
                f"  speed {run.label:21s} {run.pyramid:10s} batch {batch:3d}: {median:7.3f} s "
                f"({ratio:.2f}x), peak {peak:8.1f} MiB",
                flush=True,
            )
        del data, steps
    if options.device == "cuda" and options.max_batch > 0:
        largest = results["largest_batch"] = []
        for run in runs:
            largest.append(_largest_row(options, run, num_classes, objects))


def _largest_row(options, run: SpeedRun, num_classes: int, objects: int) -> Row:
    """The largest batch (at most ``--max-batch``) whose training step fits in the card's
    memory, and that step's peak memory."""
    peaks = {}

    def fits(batch):
        data = synthetic_batch(options.size, batch, num_classes, "cuda", objects)
        try:
            peaks[batch] = measure(run.forward(data), run.model.parameters(), "cuda")["peak"]
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del data
            run.model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    best, _ = largest_batch(fits, options.max_batch)
    print(f"  largest batch {run.label:21s} {run.pyramid:10s}: {best}", flush=True)
    return dict(
        backprop=run.label,
        pyramid=run.pyramid,
        largest=best,
        peak=peaks.get(best),
        at_limit=best == options.max_batch,
    )


def _report(options, results) -> List[str]:
    rows = results["speed"]
    notes = [
        f"median of {options.repeats} steps per detector, interleaved, after {options.warmup} "
        "warm-up steps; vs_first = the median over the rounds of the step's time / the first "
        "row's in the same round (same batch); peak = the first warm-up step's; every image "
        "has as many objects as the ROI heads sample foreground proposals at most, so that all "
        "detectors' heads do the same work"
    ]
    if len(options.speed_batches) > 1:
        path = os.path.join(options.out, "throughput_vs_batch.png")
        labels = ("batch", "training images / s")
        keys = ("backprop", "pyramid")
        notes.append(plot(rows, "batch", "images_per_s", keys, labels, path, log="x"))
    columns = ["backprop", "pyramid", "batch", "step_s", "images_per_s", "vs_first", "peak"]
    if all("page_faults_k" in r for r in rows):  # not recorded in results before 393466b
        columns += ["page_faults_k", "system_s"]
        notes.append(
            "page_faults_k, system_s = the medians of each timed step's minor page faults "
            "(thousands) and system CPU seconds (the process's: on CPU the kernel's work of "
            "handing it fresh memory is part of the step's time)"
        )
    # Derived from the stored times, not stored: results written before the column have it too.
    checkpointed = _vs_checkpointed_vitdet(rows)
    if checkpointed is not None:
        rows, columns = checkpointed, columns[:6] + ["vs_vitdet_ckpt"] + columns[6:]
        notes.append(
            "vs_vitdet_ckpt = the median over the rounds of the step's time / ViTDet's with "
            "activation checkpointing in the same round (same batch)"
        )
    md = markdown_section(f"Speed at {options.size}x{options.size}", rows, columns, notes)
    if "largest_batch" in results:
        notes = [f"doubling, then bisection, up to --max-batch {options.max_batch}"]
        columns = ["backprop", "pyramid", "largest", "peak", "at_limit"]
        md += markdown_section("Largest batch that fits", results["largest_batch"], columns, notes)
    return md


SPEED = Section(
    name="speed",
    what="Training step time of Detectron2's own ViTDet with autograd and with activation "
    "checkpointing (same RPN and heads; Detectron2 main only), then rev_det's baseline, "
    "checkpoint and reversible detectors (on CUDA also the reversible one with the parallel "
    "backward) at each of ``--speed-batches``: the median of ``--repeats`` steps, interleaved "
    "across the detectors, after ``--warmup`` steps (CUDA events on CUDA, the wall clock on "
    "CPU), images per second and the step's peak memory; on CUDA also the largest batch that "
    "fits in the card's memory per detector (doubling, then bisection; at most "
    "``--max-batch``).",
    run=_run,
    report=_report,
)
