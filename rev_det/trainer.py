"""Deprecated: this module is renamed :mod:`rev_det.runs` (the runs of rev_det's entry points).

``rev_det.trainer`` was easy to confuse with :mod:`rev_det.training` (RevAMPTrainer and the
hooks). Import from :mod:`rev_det.runs`; this alias forwards every name to it and warns once, at
import. Patching an attribute here (``mock.patch.object``) does not reach the runs: patch
:mod:`rev_det.runs`.
"""

from .utils.deprecation import moved_module

__getattr__, __all__ = moved_module(__name__, "rev_det.runs")
