"""A benchmark run: the sections chosen on the command line, in the registry's order, with the
report (``results.md``, ``results.json``, plots) rewritten after every section."""

import dataclasses
import os
import resource
import time

import detectron2
import torch

from rev_det.utils import git_commit, machine, write_results

from .detectors import ROOT, Detection
from .measure import MemoryBudget
from .options import BenchmarkOptions
from .sections import SECTIONS
from .vitdet import HAS_VITDET

__all__ = ["run", "write_report"]


def _detectron2_version() -> str:
    # Main still calls itself 0.6; ViTDet's ViT tells the two apart.
    return detectron2.__version__ + (" (main)" if HAS_VITDET else " (v0.6)")


def run(options: BenchmarkOptions, command: str) -> dict:
    """Measure the sections of ``options.sections`` and write the report to ``options.out``.

    Args:
        options: what to measure and where to write (``tools/benchmark.py`` builds them from its
            command line).
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
        "options": dataclasses.asdict(options),
    }
    start = time.time()
    det = Detection(options, MemoryBudget(options.budget_gib))
    results["baseline_pyramid"], results["model_depth"] = det.baseline, det.depth
    for name, section in SECTIONS.items():
        if name in options.sections:
            print(f"[{name}]", flush=True)
            try:
                section.run(options, results, det)
            except KeyboardInterrupt:
                # Stopped by a time limit (SIGINT): keep what the section has measured so far.
                results["interrupted"] = name
                _finish(options, results, start)
                raise
            # Written after every section, so that a long run keeps what it has measured.
            text = _finish(options, results, start)
    print(text)
    return results


def _finish(options, results, start: float) -> str:
    results["seconds"] = time.time() - start
    results["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)
    return write_report(options, results)


def write_report(options, results) -> str:
    """Write results.md and results.json to ``options.out``; returns the Markdown."""
    os.makedirs(options.out, exist_ok=True)  # the sections' reports save their plots there
    tracker = (
        "torch.cuda.max_memory_allocated" if options.device == "cuda" else "exact tensor tracker"
    )
    done = [s for s in SECTIONS.values() if s.name in results]
    md = [
        f"# Benchmark: {', '.join(s.name for s in done)}",
        "",
        f"- machine: {results['machine']}",
        f"- torch {results['torch']}, detectron2 {results['detectron2']}, rev_det "
        f"{results['commit']}; {'bf16 autocast' if options.amp else 'fp32'}",
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
        md.insert(-1, f"- detector: {options.backbone} (batch {options.batch})")
    for section in done:
        md += section.report(options, results)
    text = "\n".join(md)
    write_results(options.out, text, results)
    return text
