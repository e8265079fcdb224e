"""Deprecated: this module is now :mod:`rev_det.demo.pretrain` (only the demo uses it).

Import from :mod:`rev_det.demo.pretrain`; this alias forwards every name to it and warns once, at
import. Patching an attribute here does not reach the pretraining: patch
:mod:`rev_det.demo.pretrain`.
"""

from .utils.deprecation import moved_module

__getattr__, __all__ = moved_module(__name__, "rev_det.demo.pretrain")
