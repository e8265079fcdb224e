"""The benchmark of rev_det's backprop modes (``tools/benchmark.py`` is its command line).

- :mod:`.measure`: one training step's memory and time, the largest batch that fits, the
  memory budget that skips what would not fit;
- :mod:`.detectors`: the compared Mask R-CNN detectors (one config per backprop mode and
  pyramid), their synthetic inputs and steps, and :class:`Detection`, the memory of their steps
  that one run's sections share; :mod:`.vitdet`: Detectron2's own ViTDet beside them;
- :mod:`.sections`: the registry of sections, each defined once with how it measures and how
  it reports;
- :mod:`.report`: tables and plots; :mod:`.run`: a run of the chosen sections and its report.
"""

from .detectors import (
    BACKBONES,
    MODES,
    Detection,
    backbone_forward,
    detection_forward,
    detector_cfg,
    saturating_objects,
    synthetic_batch,
    training_step,
)
from .measure import (
    GiB,
    MemoryBudget,
    budgeted,
    interleaved_times,
    kernel_work,
    largest_batch,
    measure,
    param_mib,
    timed,
)
from .options import BenchmarkOptions
from .run import run, write_report
from .sections import SECTIONS, Section, describe_sections
from .vitdet import HAS_VITDET, vitdet_backbone, vitdet_detector, vitdet_pyramid

__all__ = [
    "BACKBONES",
    "BenchmarkOptions",
    "Detection",
    "GiB",
    "HAS_VITDET",
    "MODES",
    "MemoryBudget",
    "SECTIONS",
    "Section",
    "backbone_forward",
    "budgeted",
    "describe_sections",
    "detection_forward",
    "detector_cfg",
    "interleaved_times",
    "kernel_work",
    "largest_batch",
    "measure",
    "param_mib",
    "run",
    "saturating_objects",
    "synthetic_batch",
    "timed",
    "training_step",
    "vitdet_backbone",
    "vitdet_detector",
    "vitdet_pyramid",
    "write_report",
]
