"""rev_det's data: COCO-format datasets, the resumable training loader, and the names of the
embedded synthetic ``revdet_shapes`` datasets (defined in :mod:`rev_det.demo.shapes`, re-exported
here because ``import rev_det`` registers them)."""

from typing import Iterable, List

import numpy as np
from detectron2.data import DatasetCatalog, DatasetMapper

from ..demo.shapes import (
    SHAPES_CATEGORIES,
    SHAPES_DATASETS,
    SHAPES_TEST_DATASET,
    SHAPES_TEST_SIZE,
    draw_shapes_sample,
    ensure_shapes_dataset,
    ensure_shapes_stream,
    register_shapes_datasets,
)
from .coco_json import register_coco_datasets
from .samplers import ResumableBatchSampler, ResumableTrainLoader, build_resumable_train_loader

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_DATASETS",
    "SHAPES_TEST_DATASET",
    "SHAPES_TEST_SIZE",
    "ResumableBatchSampler",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "draw_shapes_sample",
    "ensure_shapes_dataset",
    "ensure_shapes_stream",
    "fixed_training_batch",
    "prepare_datasets",
    "register_coco_datasets",
    "register_shapes_datasets",
]


def prepare_datasets(names: Iterable[str]) -> None:
    """Generate the embedded datasets among ``names`` if their cache is missing or corrupt.

    In distributed training the first process of each machine generates and the others wait,
    so that no process reads a half-written cache.
    """
    names = [name for name in names if name in SHAPES_DATASETS + (SHAPES_TEST_DATASET,)]
    if not names:
        return
    import detectron2.utils.comm as comm

    if comm.get_local_rank() == 0:
        for name in names:
            DatasetCatalog.get(name)  # its loader generates what is missing
    comm.synchronize()


def fixed_training_batch(cfg, num_images: int, seed: int = 0) -> List[dict]:
    """The first ``num_images`` images of ``cfg.DATASETS.TRAIN[0]`` through Detectron2's training
    mapper, its random augmentation seeded: the same batch in every process, so that
    measurements of different runs (e.g. memory per image) compare like with like."""
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:num_images]  # generated if need be
    mapper = DatasetMapper(cfg, is_train=True)
    state = np.random.get_state()  # Detectron2's augmentations draw from numpy's global RNG
    np.random.seed(seed)
    try:
        return [mapper(d) for d in dicts]
    finally:
        np.random.set_state(state)
