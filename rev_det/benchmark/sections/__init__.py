"""The registry of the benchmark's sections: each one a :class:`Section`, defined once in its
module with its name, what it measures, how it measures and how it reports."""

import textwrap
from typing import Dict

from .breakdown import BREAKDOWN
from .classification import CLASSIFICATION
from .depth import DEPTH
from .detection import DETECTION, RESOLUTION
from .section import Section
from .speed import SPEED
from .whole_step import WHOLE_STEP

__all__ = ["SECTIONS", "Section", "describe_sections"]

# Name -> section, in the one order they run in whatever order ``--sections`` names them: the
# sweeps' smaller runs come first and let the memory budget predict the larger ones, and a
# detector measured by one section is not measured again by the next.
SECTIONS: Dict[str, Section] = {
    s.name: s for s in (DEPTH, RESOLUTION, DETECTION, BREAKDOWN, WHOLE_STEP, CLASSIFICATION, SPEED)
}


def describe_sections() -> str:
    """The sections as the command line's help lists them: each name, then what it measures."""
    indent = dict(initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)
    return "\n".join(s.name + "\n" + textwrap.fill(s.what, 96, **indent) for s in SECTIONS.values())
