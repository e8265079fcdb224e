"""What a benchmark run measures and where it writes: :class:`BenchmarkOptions`.

The library's one input, with the same names and defaults as ``tools/benchmark.py``'s flags
(``--cls-batches`` is ``cls_batches``), so that a script runs a benchmark without a command
line::

    from rev_det.benchmark import BenchmarkOptions, run

    run(BenchmarkOptions(backbone="rev_vit_l", sections=["whole_step"], batch=2), "my script")
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .detectors import ROOT
from .measure import GiB

__all__ = ["BenchmarkOptions"]


def _cuda_if_available() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BenchmarkOptions:
    """The options of one benchmark run (``tools/benchmark.py --help`` says what each does).

    Attributes:
        backbone: detector, ``configs/COCO/mask_rcnn_<backbone>.yaml``.
        size: square input size of the detection, depth, breakdown, whole-step and speed
            sections.
        batch: images per step in those sections (and the resolution section).
        sections: what to measure, a subset of :data:`rev_det.benchmark.SECTIONS`; default
            detection, depth and classification, and speed on CUDA.
        depths: depths of the depth section.
        depth_scope: "trunk" (the RevViT trunk alone) or "step" (the full Mask R-CNN step).
        pairs: "BACKPROP/PYRAMID" pairs the detector sections are restricted to (None: all).
        sizes: input sizes of the resolution section.
        classifiers: trunks of the classification section.
        cls_batches: batches of the classification section.
        vitdet: speed and whole-step sections: measure Detectron2's ViTDet too, where installed.
        speed_batches: batches the speed section times.
        repeats: timed steps per detector (speed section).
        warmup: untimed steps per detector first, at least 1 (speed section).
        max_batch: speed section (CUDA): upper limit of the largest-batch search, 0 for none.
        budget_gib: skip a measurement predicted to need more tensor memory than this; default
            on CPU half the machine's RAM, on CUDA none.
        step_only: detection section: the full step only, not the backbone alone as well.
        whole_step_rounds: whole-step section: paired timing rounds (0: memory only).
        amp: bf16 autocast (else fp32).
        device: "cpu" or "cuda" (default: cuda if available).
        opts: KEY VALUE overrides of the detector config.
        out: output folder; default ``benchmarks/<backbone>_<size>_<device>``.
    """

    backbone: str = "rev_vit_b"
    size: int = 1024
    batch: int = 1
    sections: Optional[List[str]] = None
    depths: List[int] = field(default_factory=lambda: [6, 12, 24, 48])
    depth_scope: str = "trunk"
    pairs: Optional[List[str]] = None
    sizes: List[int] = field(default_factory=lambda: [256, 512, 768, 1024])
    classifiers: List[str] = field(default_factory=lambda: ["vit_b", "vit_l"])
    cls_batches: List[int] = field(default_factory=lambda: [4, 16, 64])
    vitdet: bool = True
    speed_batches: List[int] = field(default_factory=lambda: [1])
    repeats: int = 5
    warmup: int = 2
    max_batch: int = 512
    budget_gib: Optional[float] = None
    step_only: bool = False
    whole_step_rounds: int = 0
    amp: bool = False
    device: str = field(default_factory=_cuda_if_available)
    opts: List[str] = field(default_factory=list)
    out: Optional[str] = None

    def __post_init__(self):
        from .sections import SECTIONS  # the sections import this module's users

        if self.warmup < 1 or self.repeats < 1:
            raise ValueError(
                "warmup and repeats must be at least 1 (the first warm-up step measures the "
                "peak memory)"
            )
        if self.sections is None:
            self.sections = ["detection", "depth", "classification"]
            self.sections += ["speed"] if self.device == "cuda" else []
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown:
            raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}.")
        if self.out is None:
            self.out = os.path.join(
                ROOT, "benchmarks", f"{self.backbone}_{self.size}_{self.device}"
            )
        if self.budget_gib is None and self.device == "cpu":
            self.budget_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / 2
