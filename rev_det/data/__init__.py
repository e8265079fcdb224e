"""Datasets shipped with rev_det: the synthetic COCO-format ``revdet_shapes``."""

from typing import Iterable

from .samplers import ResumableBatchSampler, ResumableTrainLoader, build_resumable_train_loader
from .shapes import (
    SHAPES_CATEGORIES,
    SHAPES_DATASETS,
    draw_shapes_sample,
    ensure_shapes_dataset,
    register_shapes_datasets,
)

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_DATASETS",
    "ResumableBatchSampler",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "draw_shapes_sample",
    "ensure_shapes_dataset",
    "prepare_datasets",
    "register_shapes_datasets",
]


def prepare_datasets(names: Iterable[str]) -> None:
    """Generate the embedded datasets among ``names`` if their cache is missing or corrupt.

    In distributed training the first process of each machine generates and the others wait,
    so that no process reads a half-written cache.
    """
    if not any(name in SHAPES_DATASETS for name in names):
        return
    import detectron2.utils.comm as comm

    if comm.get_local_rank() == 0:
        ensure_shapes_dataset()
    comm.synchronize()
