from .env import detectron2_has_compiled_ops
from .memory import MemoryTracker, MiB, training_step_peak

__all__ = ["MemoryTracker", "MiB", "detectron2_has_compiled_ops", "training_step_peak"]
