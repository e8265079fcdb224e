"""Deprecated: this module is now :mod:`rev_det.demo.pretrain` (only the demo uses it).

Import from :mod:`rev_det.demo.pretrain`; this alias re-exports its names and warns once, at
import. Patching an attribute here does not reach the pretraining: patch
:mod:`rev_det.demo.pretrain`.
"""

import warnings

from .demo import pretrain as _pretrain
from .demo.pretrain import (
    IGNORE,
    LABEL_STRIDE,
    PretrainSchedule,
    ShapesPretrainHead,
    ShapesSegmentation,
    build_head,
    detector_trunk,
    export_trunk,
    pretrain,
    trainable_norms,
)

warnings.warn(
    "rev_det.pretrain is renamed rev_det.demo.pretrain; import from rev_det.demo.pretrain",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_pretrain.__all__)


def __getattr__(name):
    """Any other name of the old module (e.g. a private one) from :mod:`rev_det.demo.pretrain`."""
    try:
        return getattr(_pretrain, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
