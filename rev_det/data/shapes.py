"""Deprecated: this module is now :mod:`rev_det.demo.shapes` (only the demo uses it).

Import from :mod:`rev_det.demo.shapes`, or its public names from :mod:`rev_det.data` as before
(``from rev_det.data import ensure_shapes_dataset`` does not warn); this alias forwards every
name to it and warns once, at import. Patching an attribute here (``DEFAULT_SIZES``,
``SHAPES_TEST_SIZE``, ...) does not reach the generator: patch :mod:`rev_det.demo.shapes`.
"""

from ..utils.deprecation import moved_module

__getattr__, __all__ = moved_module(__name__, "rev_det.demo.shapes")
