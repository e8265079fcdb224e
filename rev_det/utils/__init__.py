from .env import detectron2_has_compiled_ops
from .memory import MemoryTracker, MiB

__all__ = ["MemoryTracker", "MiB", "detectron2_has_compiled_ops"]
