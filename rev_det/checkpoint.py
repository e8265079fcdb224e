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
import re
import urllib.parse
import uuid
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch import nn

from .checks import explain_write_error

__all__ = [
    "AtomicCheckpointer",
    "IterationSeeder",
    "atomic_open",
    "check_vit_checkpoint",
    "is_weight",
]

logger = logging.getLogger(__name__)


def listed_keys(keys: List[str], limit: int) -> str:
    """The first ``limit`` of ``keys`` for an error message, "..." if there are more."""
    return ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")


def is_weight(key: str) -> bool:
    """Whether a state-dict entry is a weight a checkpoint must carry: everything but batch
    norms' step counters (unused with a momentum; frozen batch norms have none) and scaled
    couplings' coefficients (a pretrained ViT has none; the coupling schedule sets them)."""
    return not key.endswith(("num_batches_tracked", ".coupling.alpha", ".coupling.beta"))


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
    try:
        # os.open with mode 0o666 honours the umask (tempfile.mkstemp would make it owner-only).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # e.g. the directory was made read-only while the run trained
        _raise_explained(path, e)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _raise_explained(path, e)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _raise_explained(path: str, error: BaseException):
    """Raise ``error`` as an OSError naming ``path`` and the fix where it comes from the file
    system (full, read-only, forbidden; torch.save reports a full disk as a bare RuntimeError),
    else as it is."""
    write_error = explain_write_error(path, error)
    if write_error is not None:
        raise write_error from error
    raise error


_BLOCK_INDEX = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_PATCH_PROJ = "patch_embed.proj.weight"


def _vit_shape(keys_and_shapes) -> Tuple[Optional[int], int]:
    """(width, depth) of the ViT weights among ``(key, shape)`` pairs: the patch projection's
    output channels (None without one) and the number of ``blocks.{i}``."""
    width, depth = None, 0
    for key, shape in keys_and_shapes:
        if key == _PATCH_PROJ or key.endswith("." + _PATCH_PROJ):
            width = shape[0]
        match = _BLOCK_INDEX.search(key)
        if match:
            depth = max(depth, int(match.group(1)) + 1)
    return width, depth


def check_vit_checkpoint(model: nn.Module, state: Dict[str, Any]) -> None:
    """Raise if ``state`` holds a ViT of another width or depth than ``model``'s RevViTDet.

    RevViTDet exists to compute a pretrained ViT's function, which a checkpoint of another size
    would only partly initialise (Detectron2 would skip the weights of other shapes and the
    extra blocks with a warning). Its weights are found under the trunk's prefix (a detector's
    ``backbone.net.``) or, for a pretrained trunk (MAE, ``blocks.*``), without it.
    """
    from .modeling import REVVIT_SIZES, RevViTDet  # the models import this module's users

    for prefix, trunk in model.named_modules():
        if not isinstance(trunk, RevViTDet):
            continue
        prefix = f"{prefix}." if prefix else ""
        ours = _vit_shape((k, v.shape) for k, v in trunk.state_dict().items())
        keys = [k for k in state if k.startswith(prefix)] if prefix else list(state)
        if prefix and not keys:  # a pretrained trunk's own names
            keys = list(state)
        theirs = _vit_shape((k, tuple(state[k].shape)) for k in keys)
        if theirs[0] is None or theirs == ours:
            continue
        size = [n for n, a in REVVIT_SIZES.items() if (a["embed_dim"], a["depth"]) == theirs]
        fix = f'MODEL.REVVIT.SIZE "{size[0]}"' if size else "MODEL.REVVIT.EMBED_DIM / DEPTH"
        raise ValueError(
            f"The checkpoint holds a ViT of width {theirs[0]} and depth {theirs[1]} "
            f"({_PATCH_PROJ} and blocks.*), but the model's RevViTDet ({prefix or 'the model'}) "
            f"has width {ours[0]} and depth {ours[1]}: it would load only in part and compute "
            f"another function. Build the model of the checkpoint's size: {fix} (LazyConfig: "
            "the config of that size, e.g. configs/COCO/mask_rcnn_rev_vitdet_l_100ep.py, or "
            "model.backbone.net.embed_dim / depth), or load the checkpoint of the model's size."
        )


def _split_load_query(path):
    """``(path without its query, whether the query asks for matching heuristics)``.

    The one query Detectron2 defines for checkpoint paths is ``matching_heuristics=True``
    (Detectron2 main's ``DetectionCheckpointer``); any other is an error.
    """
    if not path or "?" not in path:
        return path, False
    path, query = path.split("?", 1)
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - {"matching_heuristics"})
    if unknown:
        raise ValueError(
            f"Checkpoint path query {query!r}: unknown option {unknown[0]!r}. The only option is "
            "matching_heuristics=True (load by Detectron2's name matching, as ViTDet's configs "
            "load MAE weights)."
        )
    return path, options.get("matching_heuristics", "").lower() in ("true", "1")


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
        self._matching_heuristics = False

    def load(self, path: str, *args, **kwargs):
        # ViTDet's configs name MAE weights as "...pth?matching_heuristics=True" (load by
        # Detectron2's name matching). Detectron2 main reads that query, v0.6 does not: it is
        # read here on both, and the path passed on without it.
        path, self._matching_heuristics = _split_load_query(path)
        try:
            return super().load(path, *args, **kwargs)
        finally:
            # Detectron2 main's DetectionCheckpointer.load keeps the URL it is loading in
            # _parsed_url_during_load, resets it only after a successful load, and asserts it is
            # unset at the next load; a rejected strict load (or any failed one) must leave the
            # checkpointer usable. v0.6 has no such attribute.
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None

    def _load_file(self, filename: str):
        loaded = super()._load_file(filename)
        if self._matching_heuristics:
            loaded["matching_heuristics"] = True
        return loaded

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
        check_vit_checkpoint(self.model, checkpoint["model"])
        incompatible = super()._load_model(checkpoint)
        reshaped = [key for key, _, _ in incompatible.incorrect_shapes]
        # The base class drops wrongly shaped weights before loading, so they are missing too.
        missing = sorted(set(incompatible.missing_keys) - set(reshaped))
        total = len(self.model.state_dict())
        loaded = total - len(missing) - len(reshaped)
        # What a caller that needs the whole model (prediction) checks after a load.
        self.missing_weights = [key for key in missing + reshaped if is_weight(key)]
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
                listed = listed_keys(absent, 10)
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
