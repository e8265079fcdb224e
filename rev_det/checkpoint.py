"""Checkpoints that survive a crash, loads that say what they matched, and exact resumes.

* :class:`AtomicCheckpointer`: Detectron2's ``DetectionCheckpointer`` that writes each checkpoint
  and the ``last_checkpoint`` tag to a temporary file in the same directory, fsyncs it and
  renames it over the final name, so a run killed while saving leaves the previous checkpoint
  and tag intact; it also reports how much of a loaded checkpoint matched the model and can
  require every backbone weight (``cfg.MODEL.REV.STRICT_LOAD``).
* :class:`IterationSeeder`: a hook that seeds torch, numpy and ``random`` before every iteration
  from (seed, rank, iteration), so the randomness of an iteration (drop path, dropout, ROI
  sampling) does not depend on where the run started. With the resumable data loader
  (:func:`rev_det.data.build_resumable_train_loader`) a resumed run then computes exactly the
  losses of the uninterrupted one.
"""

import contextlib
import logging
import os
import random
import uuid
from typing import IO, Iterator

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm

from .checks import explain_write_error

__all__ = ["AtomicCheckpointer", "IterationSeeder", "atomic_open", "is_weight"]

logger = logging.getLogger(__name__)


def is_weight(key: str) -> bool:
    """Whether a state-dict entry is a weight a checkpoint must carry: everything but batch
    norms' step counters (unused with a momentum; frozen batch norms have none)."""
    return not key.endswith("num_batches_tracked")


# The weights STRICT_LOAD requires: the trunk of GeneralizedRCNN's backbone (``net`` of rev_det's
# pyramids, ``bottom_up`` of Detectron2's FPN), which pretrained checkpoints provide; pyramids and
# heads are new in a detector and start from their initialization. A backbone without either
# sub-module is required whole.
_TRUNK_PREFIXES = ("backbone.net.", "backbone.bottom_up.")
_BACKBONE_PREFIX = "backbone."


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success, move it to ``path``.

    The file is flushed and fsynced before ``os.replace`` renames it (atomic within a file
    system), and the directory is fsynced after, so ``path`` holds either its old content or
    the complete new one, even if the process dies or the machine loses power. If the body
    raises, the temporary file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with mode 0o666 honours the umask (tempfile.mkstemp would make it owner-only).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # torch.save reports a full disk as a bare RuntimeError; name the file and the cause.
        write_error = explain_write_error(path, e)
        if write_error is not None:
            raise write_error from e
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves, a load summary and an optional strict load.

    Saving writes ``<name>.pth`` and then the ``last_checkpoint`` tag through
    :func:`atomic_open`: ``save_dir`` must be a local directory. Loading logs, after Detectron2's
    lists of missing and unexpected keys, one line with how many of the model's weights were
    loaded and how many were missing, of another shape, or unused.

    Args:
        model, save_dir, save_to_disk, checkpointables: as for ``DetectionCheckpointer``.
        strict_load: raise if a loaded checkpoint lacks a weight of the backbone's trunk
            (``backbone.net.*`` / ``backbone.bottom_up.*``, else ``backbone.*``), or has one of
            another shape, instead of leaving it at its initialization. Pyramid and head weights
            may be missing: a pretrained trunk has none.
    """

    def __init__(
        self, model, save_dir="", *, strict_load=False, save_to_disk=None, **checkpointables
    ):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict_load = strict_load

    def load(self, path: str, *args, **kwargs):
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # Detectron2 main's DetectionCheckpointer.load keeps the URL it is loading in
            # _parsed_url_during_load, resets it only after a successful load, and asserts it is
            # unset at the next load; a rejected strict load (or any failed one) must leave the
            # checkpointer usable. v0.6 has no such attribute.
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        with atomic_open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_open(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(last_filename_basename)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        reshaped = [key for key, _, _ in incompatible.incorrect_shapes]
        # The base class drops wrongly shaped weights before loading, so they are missing too.
        missing = sorted(set(incompatible.missing_keys) - set(reshaped))
        total = len(self.model.state_dict())
        loaded = total - len(missing) - len(reshaped)
        complete = not (missing or reshaped or incompatible.unexpected_keys)
        (self.logger.info if complete else self.logger.warning)(
            "Loaded %d of the model's %d weights from the checkpoint: %d missing, %d of another "
            "shape, %d in the checkpoint unused.",
            loaded,
            total,
            len(missing),
            len(reshaped),
            len(incompatible.unexpected_keys),
        )
        if self.strict_load:
            keys = self.model.state_dict()
            required = tuple(p for p in _TRUNK_PREFIXES if any(k.startswith(p) for k in keys))
            absent = [
                key
                for key in missing + reshaped
                if key.startswith(required or _BACKBONE_PREFIX) and is_weight(key)
            ]
            if absent:
                listed = ", ".join(absent[:10]) + (", ..." if len(absent) > 10 else "")
                raise RuntimeError(
                    f"Strict load: the checkpoint lacks {len(absent)} backbone weights, or has "
                    f"them in another shape: {listed}. If it is a pretrained trunk in another "
                    "layout (timm, MAE, MViTv2, ...), convert it with tools/convert_pretrained.py; "
                    "to train these weights from their initialization instead, set "
                    "MODEL.REV.STRICT_LOAD False (LazyConfig: train.strict_load=False)."
                )
        return incompatible


class IterationSeeder(HookBase):
    """Seed torch (CPU and CUDA), numpy and ``random`` before each iteration.

    The seed of iteration i on rank r is derived from (seed, r, i) by numpy's ``SeedSequence``,
    so every iteration's random draws are a function of the iteration alone, the same in a run
    resumed from a checkpoint as in the uninterrupted run, without saving generator states (a
    checkpoint is written by the main process only, and evaluation between the save and the
    next iteration draws random numbers too). Register it first, so that it runs before the
    other hooks' ``before_step``.

    Args:
        seed: the run's seed (``cfg.SEED``, ``train.seed``); must be non-negative.
    """

    def __init__(self, seed: int):
        if seed < 0:
            raise ValueError(f"IterationSeeder needs a non-negative seed, got {seed}.")
        self._seed = seed

    def before_step(self):
        seed = np.random.SeedSequence((self._seed, comm.get_rank(), self.trainer.iter))
        seed = int(seed.generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
