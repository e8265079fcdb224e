"""The whole-step section: everything a training step must hold (parameters, gradients, AdamW's
state, activations and temporaries), with the optimizer step after backward and inside it.

Two AdamW iterations are run in Detectron2's order (forward, ``zero_grad``, backward, ``step``:
Detectron2 v0.6's SimpleTrainer keeps the last step's gradients through the next forward), and
the second one is measured, so the optimizer state is alive. On CPU the exact tracker counts
what the iterations create (gradients, AdamW's moments, activations); the parameters, created
before, are added. On CUDA the allocator's peaks are absolute: ``max_memory_allocated`` and
``max_memory_reserved`` over the second iteration.
"""

import statistics
from typing import Callable, Dict, List, Tuple

import torch

from rev_det.modeling import build_detector
from rev_det.solver import build_optimizer
from rev_det.utils import MemoryTracker, MiB

from ..detectors import Detection, config_batch, detection_forward
from ..measure import interleaved_times, paired_ratio, param_mib
from ..report import markdown_section
from ..vitdet import HAS_VITDET, vitdet_detector
from .section import Section

__all__ = ["WHOLE_STEP", "whole_step_memory"]


def training_iteration(optimizer, forward: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One iteration in Detectron2's order: forward, ``zero_grad``, backward, ``step``."""

    def iteration():
        loss = forward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        del loss
        optimizer.step()

    return iteration


def whole_step_memory(model, optimizer, forward: Callable[[], torch.Tensor], device: str) -> dict:
    """MiB of the second of two training iterations of ``model`` (see the module docstring):
    ``optimizer_state``, ``whole_step_peak`` (parameters included), ``step_peak`` (the peak
    less parameters and optimizer state: activations, temporaries and the gradients alive then)
    and, on CUDA, ``whole_step_reserved``."""
    iteration = training_iteration(optimizer, forward)

    def state_bytes():
        return sum(
            t.numel() * t.element_size()
            for state in optimizer.state.values()
            for t in state.values()
            if torch.is_tensor(t)
        )

    params = param_mib(model) * MiB
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        iteration()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        iteration()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        extra = {"whole_step_reserved": torch.cuda.max_memory_reserved() / MiB}
    else:
        with MemoryTracker() as mem:
            iteration()
            mem.reset_peak()
            iteration()
        peak, extra = params + mem.peak, {}
    state = state_bytes()
    optimizer.zero_grad(set_to_none=True)
    return {
        "optimizer_state": state / MiB,
        "step_peak": (peak - params - state) / MiB,
        "whole_step_peak": peak / MiB,
        **extra,
    }


def _detectors(options, det: Detection) -> List[Tuple[str, Tuple[str, str], Callable]]:
    """(label, (backprop, pyramid) of the config, build model from cfg) of the detectors
    measured: rev_det's main runs, and Detectron2's ViTDet (autograd, activation checkpointing)
    on the same config where it is installed."""
    runs = [(f"{b}/{p}", (b, p), build_detector) for b, p in det.main_runs()]
    if options.vitdet and HAS_VITDET and det.vit and not det.surrogate:
        for ckpt, label in ((False, "ViTDet"), (True, "ViTDet, act. ckpt")):

            def build(cfg, ckpt=ckpt):
                return vitdet_detector(cfg, ckpt, options.size)

            runs.append((label, ("autograd", "simple"), build))
    return runs


def _run(options, results, det: Detection):
    rows = []
    for label, pair, build in _detectors(options, det):
        iterations = []  # kept only to be timed
        for in_backward in (False, True):
            cfg = det.cfg(*pair).clone()
            cfg.SOLVER.OPTIMIZER = "ADAMW"
            cfg.SOLVER.STEP_IN_BACKWARD = in_backward
            cfg.SOLVER.AMP.ENABLED = False  # the benchmark autocasts itself (--amp: bfloat16)
            torch.manual_seed(0)
            model = build(cfg).train()
            optimizer = build_optimizer(cfg, model)
            batch = config_batch(cfg, options.size, options.batch)
            forward = detection_forward(model, batch, options.amp)
            row: Dict[str, object] = dict(detector=label, step_in_backward=in_backward)
            row["params"] = param_mib(model)
            row.update(whole_step_memory(model, optimizer, forward, options.device))
            print(
                f"  {label}, step in backward {in_backward}: whole step "
                f"{row['whole_step_peak']:9.1f} MiB",
                flush=True,
            )
            rows.append(row)
            if options.whole_step_rounds:
                iterations.append(training_iteration(optimizer, forward))
            del model, optimizer, forward
        if iterations:
            after, inside = interleaved_times(iterations, options.whole_step_rounds, options.device)
            rows[-2]["seconds"] = statistics.median(after)
            rows[-1]["seconds"] = statistics.median(inside)
            rows[-2]["time_vs_after"] = 1.0  # the reference
            rows[-1]["time_vs_after"] = paired_ratio(inside, after)
    results["whole_step"] = rows


def _report(options, results) -> List[str]:
    rows = results["whole_step"]
    columns = ["detector", "step_in_backward", "params", "optimizer_state", "step_peak"]
    columns += ["whole_step_peak"]
    notes = [
        "AdamW (layer-wise lr decay groups), the second of two iterations in Detectron2's order "
        "(forward, zero_grad, backward, step); params and optimizer_state are what the step "
        "holds throughout; step_peak = whole_step_peak - params - optimizer_state: activations, "
        "temporaries and the gradients alive at the peak (all of them, as many MiB as the "
        "parameters, when the step follows backward; one parameter's at a time inside it)",
    ]
    if any("whole_step_reserved" in r for r in rows):
        columns += ["whole_step_reserved"]
    if any("seconds" in r for r in rows):
        columns += ["seconds", "time_vs_after"]
        notes.append(
            f"seconds: median of {options.whole_step_rounds} iterations timed in paired rounds (one "
            "of each, then again); time_vs_after: the median over the rounds of the iteration's "
            "time inside backward over the one after it"
        )
    if not HAS_VITDET:
        notes.append("Detectron2's ViTDet rows need Detectron2 main (v0.6 has no ViTDet)")
    title = f"Whole training step at {options.size}x{options.size}, batch {options.batch}"
    return markdown_section(title, rows, columns, notes)


WHOLE_STEP = Section(
    name="whole_step",
    what="Everything one AdamW training step holds (parameters, gradients, optimizer state, "
    "activations) for the baseline, checkpoint and reversible detectors and Detectron2's "
    "ViTDet (where installed), with the optimizer step after backward and inside it "
    "(SOLVER.STEP_IN_BACKWARD).",
    run=_run,
    report=_report,
)
