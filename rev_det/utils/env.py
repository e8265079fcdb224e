"""Facts about the environment: the installed Detectron2, the machine, the checkout."""

import os
import platform
import subprocess

import torch

__all__ = ["detectron2_has_compiled_ops", "git_commit", "machine"]


def detectron2_has_compiled_ops() -> bool:
    """True if Detectron2 was built with its C++ ops (e.g. the fast COCO evaluator).

    rev_det's set-up builds a pure-Python Detectron2 whose ``_C`` placeholder raises
    ImportError on op lookup; a Detectron2 built from source has the real ops.
    """
    try:
        from detectron2 import _C

        _C.COCOevalAccumulate
    except (ImportError, AttributeError):
        return False
    return True


def machine() -> str:
    """The machine a measurement ran on: the GPU's name, or the CPU model, its cores and torch's
    threads (speed varies by machine: every committed figure names it)."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name()}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"CPU: {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def git_commit(path: str = ".") -> str:
    """The commit of the checkout at ``path`` ("-dirty" with uncommitted changes), or
    "unknown" outside a git checkout."""
    try:
        cmd = ["git", "-C", path, "describe", "--always", "--dirty"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
