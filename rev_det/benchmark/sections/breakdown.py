"""The breakdown section: where the reversible step's activation memory goes, part by part.

One training step of the ``--backbone`` detector (its main reversible run), on the exact CPU
tracker, with forward hooks on its parts::

    trunk + pyramid (backbone) -> RPN (proposal_generator)
        -> box head (roi_heads.box_pooler, box_head, box_predictor)
        -> mask head (roi_heads.mask_pooler, mask_head)

The trunk and the pyramid are one part: a reversible pyramid runs the trunk's fusion inside its
own recomputed unit, so what either keeps cannot be told apart by their forwards.

Per part: what it keeps till backward (the tracked bytes alive after its forward less those
before it: its output and what autograd saved) and its transient peak (the most bytes alive
during its forward above those before it). What no part owns (the ROI heads' proposal
sampling, the losses) is the rest of the forward. Then the step's peak, and whether it comes in
forward or backward.
"""

from typing import Dict, List

import torch

from rev_det.modeling import build_detector
from rev_det.utils import MemoryTracker, MiB

from ..detectors import Detection, config_batch, detection_forward
from ..report import markdown_section
from .section import Section

__all__ = ["BREAKDOWN"]

# Part -> the modules whose forwards it is (names in GeneralizedRCNN).
PARTS = {
    "trunk + pyramid": ["backbone"],
    "RPN": ["proposal_generator"],
    "box head": ["roi_heads.box_pooler", "roi_heads.box_head", "roi_heads.box_predictor"],
    "mask head": ["roi_heads.mask_pooler", "roi_heads.mask_head"],
}


def _breakdown(model, forward) -> Dict[str, object]:
    mem = MemoryTracker()
    kept: Dict[str, float] = {part: 0.0 for part in PARTS}
    transient: Dict[str, float] = {part: 0.0 for part in PARTS}
    stack = []
    modules = dict(model.named_modules())
    handles = []
    for part, names in PARTS.items():
        for name in names:

            def pre(module, args, part=part):
                stack.append((mem.current, mem.peak))
                mem.peak = mem.current  # this module's own peak from here

            def post(module, args, output, part=part):
                before, outer_peak = stack.pop()
                kept[part] += (mem.current - before) / MiB
                transient[part] = max(transient[part], (mem.peak - before) / MiB)
                mem.peak = max(outer_peak, mem.peak)

            module = modules[name]
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with mem:
            loss = forward()
            stored, forward_peak = mem.current / MiB, mem.peak / MiB
            loss.backward()
            del loss
    finally:
        for handle in handles:
            handle.remove()
    return {
        "kept": kept,
        "transient": transient,
        "stored": stored,
        "forward_peak": forward_peak,
        "step_peak": mem.peak / MiB,
    }


def _run(options, results, det: Detection):
    backprop, pyramid = det.main_runs()[-1]
    cfg = det.cfg(backprop, pyramid)
    torch.manual_seed(0)
    model = build_detector(cfg).train()
    batch = config_batch(cfg, options.size, options.batch)
    found = _breakdown(model, detection_forward(model, batch, options.amp))
    rows: List[Dict[str, object]] = [
        dict(part=part, kept=found["kept"][part], transient=found["transient"][part])
        for part in PARTS
    ]
    rest = found["stored"] - sum(found["kept"].values())
    rows.append(dict(part="rest of the forward", kept=rest, transient="-"))
    results["breakdown"] = {
        "detector": f"{backprop}/{pyramid}",
        "recompute_heads": bool(cfg.MODEL.REV.RECOMPUTE_HEADS),
        "rows": rows,
        **{k: found[k] for k in ("stored", "forward_peak", "step_peak")},
    }


def _report(options, results) -> List[str]:
    found = results["breakdown"]
    notes = [
        "kept: MiB alive after the part's forward less before it (its output and what autograd "
        "saved for backward); transient: the most MiB alive during its forward above those "
        "before it; the rest of the forward: proposal sampling and losses, less what was freed "
        "(it can be negative)",
        f"kept till backward in all: {found['stored']:.1f} MiB; forward peak "
        f"{found['forward_peak']:.1f} MiB; step peak {found['step_peak']:.1f} MiB (in "
        f"{'forward' if found['step_peak'] <= found['forward_peak'] else 'backward'}), "
        "parameter gradients included",
    ]
    heads = " (heads recomputed)" if found["recompute_heads"] else ""
    title = f"Where the {found['detector']} step's activations go{heads}"
    return markdown_section(title, found["rows"], ["part", "kept", "transient"], notes)


BREAKDOWN = Section(
    name="breakdown",
    what="Where the reversible detector's step memory goes: per part (trunk + pyramid, RPN, box "
    "head, mask head) what it keeps till backward and its transient peak, exact CPU tracker.",
    run=_run,
    report=_report,
)
