from .env import detectron2_has_compiled_ops, git_commit, machine
from .files import sha256_file, write_results
from .memory import MemoryTracker, MiB, training_step_peak

__all__ = [
    "MemoryTracker",
    "MiB",
    "detectron2_has_compiled_ops",
    "git_commit",
    "machine",
    "sha256_file",
    "training_step_peak",
    "write_results",
]
