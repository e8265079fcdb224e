"""Checks of what a user hands to training: configs, data, weight files and the output directory.

Both entry points (``projects/train_net.py`` for yacs configs and
``projects/lazyconfig_train_net.py`` for LazyConfigs) run these, so that a bad input ends in an
error that names the setting or file and the fix, before training starts where that can be
known then, or in a warning with a count, never in silence. The setting names in messages are
those of the config system in use (:data:`YACS` or :data:`LAZY`).

* :mod:`.names`: how messages spell settings (:class:`SettingNames`, :data:`YACS`, :data:`LAZY`).
* :mod:`.config`: configs (:func:`check_yacs_config`, :func:`check_lazy_config`, overrides).
* :mod:`.files`: checkpoint files (:func:`checkpoint_file_problem`, :func:`check_weights_file`).
* :mod:`.data`: data (:func:`scan_annotations`, :func:`check_num_classes`, :class:`CheckedMapper`).
* :mod:`.output_dir`: the output directory (:class:`OutputDirLock`, :func:`explain_write_error`).
* :mod:`.divergence`: a diverged run (:func:`divergence_advice`).
"""

from .config import (
    check_lazy_config,
    check_lazy_overrides,
    check_no_flags_in_overrides,
    check_yacs_config,
    complete_lazy_config,
    largest_image_side,
)
from .data import AnnotationSummary, CheckedMapper, check_num_classes, scan_annotations
from .divergence import divergence_advice
from .files import check_weights_file, checkpoint_file_problem
from .names import LAZY, YACS, SettingNames
from .output_dir import OutputDirInUseError, OutputDirLock, explain_write_error

__all__ = [
    "LAZY",
    "YACS",
    "AnnotationSummary",
    "CheckedMapper",
    "OutputDirInUseError",
    "OutputDirLock",
    "SettingNames",
    "check_lazy_config",
    "check_lazy_overrides",
    "check_no_flags_in_overrides",
    "check_num_classes",
    "check_weights_file",
    "check_yacs_config",
    "checkpoint_file_problem",
    "complete_lazy_config",
    "divergence_advice",
    "explain_write_error",
    "largest_image_side",
    "scan_annotations",
]
