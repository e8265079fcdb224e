"""Modules that moved: the old name warns once, at import, and forwards every name to the new
module."""

import importlib
import warnings
from typing import Any, Callable, List, Tuple

__all__ = ["moved_module"]


def moved_module(old: str, new: str) -> Tuple[Callable[[str], Any], List[str]]:
    """The body of a module ``old`` that is now ``new``: warn (a DeprecationWarning attributed
    to the importer) and return the old module's ``__getattr__`` (every name, public or private,
    from ``new``) and ``__all__`` (``new``'s)::

        __getattr__, __all__ = moved_module(__name__, "rev_det.runs")

    Patching an attribute of the old module does not reach the new one: patch the new module.
    """
    module = importlib.import_module(new)
    # stacklevel 3: past this function and the old module's body, to the import statement
    # (the warnings module skips the import machinery's frames).
    warnings.warn(f"{old} is renamed {new}; import from {new}", DeprecationWarning, stacklevel=3)

    def __getattr__(name: str) -> Any:
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None

    return __getattr__, list(module.__all__)
