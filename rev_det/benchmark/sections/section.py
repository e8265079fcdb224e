"""What a section of the benchmark is: defined once, with its name, what it measures, how it
measures and how it reports."""

from dataclasses import dataclass
from typing import Callable, List

__all__ = ["Section"]


@dataclass(frozen=True)
class Section:
    """One section of the benchmark.

    Attributes:
        name: its name in ``--sections`` and its key in ``results.json``.
        what: what it measures, as the command line's help describes it.
        run: ``run(options, results, det)`` measures (``det``: the run's
            :class:`~rev_det.benchmark.detectors.Detection`, which holds the memory budget) and
            stores its rows in ``results[name]``.
        report: ``report(options, results)``: its lines of ``results.md`` (tables, notes) and
            its plots.
        detector: whether it measures the ``--backbone`` detector (the report then names it).
    """

    name: str
    what: str
    run: Callable[..., None]
    report: Callable[..., List[str]]
    detector: bool = True
