"""Measuring one training step: its memory (exact tracker on CPU, the allocator on CUDA), its
time, the largest batch that fits, and the memory budget that skips what would not fit."""

import resource
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from rev_det.utils import MemoryTracker, MiB

__all__ = [
    "GiB",
    "MemoryBudget",
    "Row",
    "budgeted",
    "interleaved_times",
    "kernel_work",
    "largest_batch",
    "measure",
    "paired_ratio",
    "param_mib",
    "timed",
]

GiB = 1024 * MiB

# One line of a results table (and of results.json): column name -> value.
Row = Dict[str, object]


def measure(forward: Callable[[], torch.Tensor], params, device: str) -> Dict[str, float]:
    """Memory of one training step: ``forward()`` returns the loss, then it is back-propagated.

    Returns:
        MiB: ``peak`` (everything the step creates), ``grads`` (parameter gradients alive at the
        end), ``activations`` (peak of everything but parameter gradients; on CUDA peak minus
        gradients, an upper bound) and ``stored`` (alive between forward and backward).
    """
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = forward()
        torch.cuda.synchronize()
        stored = torch.cuda.memory_allocated() - base
        loss.backward()
        del loss
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        activations = peak - grads
    else:
        with MemoryTracker(grads_of=params) as mem:
            loss = forward()
            stored = mem.current
            loss.backward()
            del loss
        peak, grads, activations = mem.peak, mem.grads, mem.activation_peak
    for p in params:
        p.grad = None
    return {
        "peak": peak / MiB,
        "activations": activations / MiB,
        "grads": grads / MiB,
        "stored": stored / MiB,
    }


def param_mib(model: nn.Module) -> float:
    """MiB of the parameters of ``model`` (listed apart from every step's peak)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / MiB


def timed(step: Callable[[], None], device: str) -> float:
    """Seconds of one ``step()``: CUDA events on CUDA, the wall clock on CPU."""
    if device != "cuda":
        start = time.perf_counter()
        step()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000


def interleaved_times(
    steps: Sequence[Callable[[], None]], repeats: int, device: str
) -> List[List[float]]:
    """Seconds of each of ``steps``, run in turn ``repeats`` times (one of each, then again),
    so that a machine that slows down or speeds up during the run slows every step alike.

    Returns:
        Per step, its ``repeats`` times.
    """
    times: List[List[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, seconds in zip(steps, times):
            seconds.append(timed(step, device))
    return times


def kernel_work(step: Callable[[], None], record: List[Tuple[int, float]]) -> Callable[[], None]:
    """``step``, appending each run's minor page faults and system CPU seconds to ``record``
    (the process's, from ``resource.getrusage``).

    On CPU a step's wall time includes the kernel's work of handing the process fresh memory:
    pages that the allocator returned to the system and faults back in, zeroed. How much a step
    faults depends on what ran before it in the process (``docs/speed.md``), so the benchmark
    reports it beside the times.
    """

    def run():
        before = resource.getrusage(resource.RUSAGE_SELF)
        step()
        after = resource.getrusage(resource.RUSAGE_SELF)
        record.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))

    return run


def paired_ratio(seconds: Sequence[float], reference: Sequence[float]) -> float:
    """The median, over the rounds of :func:`interleaved_times`, of one step's time over the
    reference step's in the same round: a machine whose speed drifts during the run moves both
    alike, where a ratio of medians compares steps timed minutes apart."""
    return statistics.median(s / r for s, r in zip(seconds, reference, strict=True))


def largest_batch(fits: Callable[[int], bool], limit: int) -> Tuple[int, List[int]]:
    """The largest batch <= ``limit`` for which ``fits(batch)``: doubling, then bisection.

    Returns:
        The batch (0 if even 1 does not fit) and the doubling batches that fit (1, 2, 4, ...).
    """
    lo, hi, doubling = 0, 1, []
    while hi <= limit and fits(hi):
        doubling.append(hi)
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, doubling


class MemoryBudget:
    """Skips measurements whose predicted tensor memory exceeds a limit.

    A series is one configuration measured along one variable (depth, pixel count or batch).
    Its next point is predicted by the straight line through its last two points (through the
    origin from a single point), from parameters + peak.

    Args:
        gib: the limit in GiB; None for no limit.
    """

    def __init__(self, gib: Optional[float]):
        self.limit = gib * GiB if gib else None
        self.series: Dict[Tuple, List[Tuple[float, float]]] = {}

    def predict(self, series: Tuple, x: float) -> Optional[float]:
        """Predicted bytes at ``x``, or None if the series has no point below ``x``."""
        pts = sorted(p for p in self.series.get(series, []) if p[0] < x)
        if not pts:
            return None
        if len(pts) == 1:
            return pts[0][1] * x / pts[0][0]
        (x0, m0), (x1, m1) = pts[-2:]
        return m1 + (m1 - m0) / (x1 - x0) * (x - x1)

    def over(self, points: Sequence[Tuple[Tuple, float]]) -> List[Tuple[Tuple, float]]:
        """The predictions ``(series, bytes)`` at the ``(series, x)`` points if any exceeds the
        limit (a point may belong to several series), else an empty list."""
        predictions = [(s, self.predict(s, x)) for s, x in points]
        predictions = [(s, p) for s, p in predictions if p is not None]
        if self.limit is None or all(p <= self.limit for _, p in predictions):
            return []
        return predictions

    def record(self, points: Iterable[Tuple[Tuple, float]], nbytes: float):
        """Add the measured ``nbytes`` at each ``(series, x)`` point."""
        for series, x in points:
            self.series.setdefault(series, []).append((x, nbytes))


def budgeted(budget: MemoryBudget, points, params_mib: float, what: str, run) -> Row:
    """``run()`` (a dict of MiB) unless the budget predicts too much; then a skipped row with
    the prediction along the first of ``points``' series that has one."""
    predictions = budget.over(points)
    if predictions:
        series, predicted = predictions[0]
        print(f"  skipped {what}: predicted {predicted / GiB:.1f} GiB > budget", flush=True)
        return {
            "measured": False,
            "predicted_peak": predicted / MiB - params_mib,
            "predicted_along": series[0],
        }
    mem = run()
    budget.record(points, (params_mib + mem["peak"]) * MiB)
    return {"measured": True, **mem}
