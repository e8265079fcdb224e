"""The pieces of the benchmark's report: rows grouped into series, Markdown tables and sections,
and PNG plots of measured points."""

import os
from typing import Dict, List, Sequence, Tuple

import matplotlib

# Plots are only saved to files, never shown: no display needed.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from .measure import Row  # noqa: E402

__all__ = ["label", "markdown_section", "plot", "series", "table"]


def series(rows: List[Row], keys: Sequence[str]) -> List[List[Row]]:
    """Rows grouped by the values of ``keys``, in order of first appearance."""
    groups: Dict[Tuple, List[Row]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return list(groups.values())


def label(row: Row) -> str:
    """The name of the series of ``row`` in notes and legends: model / backprop / pyramid."""
    parts = [row.get("model"), row["backprop"], row.get("pyramid")]
    return " / ".join(str(p) for p in parts if p not in (None, "none"))


def _cell(row: Row, column: str) -> str:
    value = row.get(column)
    if value is None:
        # A skipped run has a prediction of its peak (only): "~X (predicted)".
        predicted = row.get(column.replace("peak", "predicted_peak"))
        return f"~{predicted:.1f} (predicted)" if predicted is not None else "skipped"
    if column == "vs_baseline":
        return f"{value:.2f}x" + (" (predicted)" if row["vs_predicted"] else "")
    if column in ("vs_first", "vs_vitdet_ckpt"):
        return f"{value:.2f}x"
    if column == "time_vs_after":
        return f"{value:.3f}x"
    if column == "step_s":
        return f"{value:.3f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def table(rows: List[Row], columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` of ``rows``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def markdown_section(
    title: str, rows: List[Row], columns: Sequence[str], notes: List[str]
) -> List[str]:
    """A Markdown section: title, table and notes (one bullet each)."""
    return [f"## {title}", "", table(rows, columns), "", *[f"- {n}" for n in notes], ""]


def plot(rows: List[Row], x: str, y: str, keys: Sequence[str], labels, path: str, log="") -> str:
    """Save a line per series (rows grouped by the ``keys``) of measured points.

    Args:
        labels: the x and y axis labels.
        log: the axes ("x", "y" or "xy") on a log scale.

    Returns:
        The note that names the plot in the report.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for group in series(rows, keys):
        pts = sorted((r[x], r[y]) for r in group if r.get(y) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label(group[0]))
    if "x" in log:
        ax.set_xscale("log", base=2)
    if "y" in log:
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: `{os.path.basename(path)}`"
