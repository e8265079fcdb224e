"""A benchmark run: the sections chosen on the command line, in the registry's order, with the
report (``results.md``, ``results.json``, plots) rewritten after every section."""

import os
import resource
import time

import detectron2
import torch

from rev_det.utils import git_commit, machine, write_results

from .detectors import ROOT, Detection
from .measure import MemoryBudget
from .sections import SECTIONS
from .vitdet import HAS_VITDET

__all__ = ["run", "write_report"]


def _detectron2_version() -> str:
    # Main still calls itself 0.6; ViTDet's ViT tells the two apart.
    return detectron2.__version__ + (" (main)" if HAS_VITDET else " (v0.6)")


def run(args, command: str) -> dict:
    """Measure the sections of ``args.sections`` and write the report to ``args.out``.

    Args:
        args: the parsed command line of ``tools/benchmark.py``.
        command: that command line, as the report quotes it.

    Returns:
        The results, as written to ``results.json``.
    """
    results = {
        "machine": machine(),
        "torch": torch.__version__,
        "detectron2": _detectron2_version(),
        "commit": git_commit(ROOT),
        "command": command,
        "args": vars(args),
    }
    start = time.time()
    det = Detection(args, MemoryBudget(args.budget_gib))
    results["baseline_pyramid"], results["model_depth"] = det.baseline, det.depth
    for name, section in SECTIONS.items():
        if name in args.sections:
            print(f"[{name}]", flush=True)
            try:
                section.run(args, results, det)
            except KeyboardInterrupt:
                # Stopped by a time limit (SIGINT): keep what the section has measured so far.
                results["interrupted"] = name
                _finish(args, results, start)
                raise
            # Written after every section, so that a long run keeps what it has measured.
            text = _finish(args, results, start)
    print(text)
    return results


def _finish(args, results, start: float) -> str:
    results["seconds"] = time.time() - start
    results["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    return write_report(args, results)


def write_report(args, results) -> str:
    """Write results.md and results.json to ``args.out``; returns the Markdown."""
    os.makedirs(args.out, exist_ok=True)  # the sections' reports save their plots there
    tracker = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "exact tensor tracker"
    done = [s for s in SECTIONS.values() if s.name in results]
    md = [
        f"# Benchmark: {', '.join(s.name for s in done)}",
        "",
        f"- machine: {results['machine']}",
        f"- torch {results['torch']}, detectron2 {results['detectron2']}, rev_det "
        f"{results['commit']}; {'bf16 autocast' if args.amp else 'fp32'}",
        f"- command: `{results['command']}`",
        f"- memory in MiB ({tracker}); peak = everything the step creates (activations, "
        "temporaries, parameter gradients); parameters are listed apart; optimizer state is not "
        "included (except in the whole_step section); stored = alive between forward and "
        "backward",
        f"- process peak RSS {results['max_rss_gib']:.1f} GiB; {results['seconds'] / 60:.0f} min",
        "",
    ]
    if "interrupted" in results:
        md.insert(-1, f"- interrupted during the {results['interrupted']} section: partial results")
    if any(s.detector for s in done):
        md.insert(-1, f"- detector: {args.backbone} (batch {args.batch})")
    for section in done:
        md += section.report(args, results)
    text = "\n".join(md)
    write_results(args.out, text, results)
    return text
