"""Deprecated: this module is now :mod:`rev_det.demo.shapes` (only the demo uses it).

Import from :mod:`rev_det.demo.shapes`, or its public names from :mod:`rev_det.data` as before
(``from rev_det.data import ensure_shapes_dataset`` does not warn); this alias re-exports its
names and warns once, at import. Patching an attribute here (``DEFAULT_SIZES``,
``SHAPES_TEST_SIZE``, ...) does not reach the generator: patch :mod:`rev_det.demo.shapes`.
"""

import warnings

from ..demo import shapes as _shapes
from ..demo.shapes import (
    DEFAULT_SIZES,
    GENERATOR_VERSION,
    MAX_OBJECTS,
    SHAPES_CATEGORIES,
    SHAPES_DATASETS,
    SHAPES_TEST_DATASET,
    SHAPES_TEST_SIZE,
    _cache_problem,
    _generate_split,
    _params,
    check_stream,
    draw_shapes_sample,
    ensure_shapes_dataset,
    ensure_shapes_stream,
    register_shapes_datasets,
    shapes_dataset_dir,
)

warnings.warn(
    "rev_det.data.shapes is renamed rev_det.demo.shapes; import from rev_det.demo.shapes",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = list(_shapes.__all__)


def __getattr__(name):
    """Any other name of the old module (e.g. a private one) from :mod:`rev_det.demo.shapes`."""
    try:
        return getattr(_shapes, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
