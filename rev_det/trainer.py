"""Deprecated: this module is renamed :mod:`rev_det.runs` (the runs of rev_det's entry points).

``rev_det.trainer`` was easy to confuse with :mod:`rev_det.training` (RevAMPTrainer and the
hooks). Import from :mod:`rev_det.runs`; this alias re-exports its names and warns once, at import.
Patching an attribute here (``mock.patch.object``) does not reach the runs: patch
:mod:`rev_det.runs`.
"""

import warnings

from . import runs as _runs
from .runs import (
    Trainer,
    check_train_classes,
    evaluate_lazy,
    lazy_dataset_names,
    load_lazy_config,
    load_weights,
    load_yacs_config,
    output_dir_run,
    resume_data_at,
    run_lazy,
    train_lazy,
    with_rev_det_hooks,
)

warnings.warn(
    "rev_det.trainer is renamed rev_det.runs; import from rev_det.runs",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_runs.__all__)


def __getattr__(name):
    """Any other name of the old module (e.g. one it imported) from :mod:`rev_det.runs`."""
    try:
        return getattr(_runs, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
