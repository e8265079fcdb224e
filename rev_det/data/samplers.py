"""A training data loader that resumes exactly where a checkpoint was taken.

When a run resumes, Detectron2's training loader restarts its sampler from the seed, loses the
images waiting in its aspect-ratio groups, and draws random augmentations from whatever state
the process or data-loading worker happens to have: the resumed run trains on other batches than
the run it continues. Here instead:

* :class:`ResumableBatchSampler` yields the per-rank batches of Detectron2's infinite shuffled
  stream (:class:`~detectron2.data.samplers.TrainingSampler`'s order), grouped by aspect ratio
  as :class:`~detectron2.data.common.AspectRatioGroupedDataset` groups them, from any iteration
  on: it replays the stream's indices (no image is read) to rebuild the groups.
* Each sample is mapped with torch (CPU), numpy and ``random`` seeded from (seed, position of the
  sample in the stream), so its augmentation does not depend on which worker maps it or on what
  ran before; the caller's generators are left untouched.
* :func:`build_resumable_train_loader` takes the arguments of Detectron2's
  ``build_detection_train_loader`` (and a yacs config the same way); set ``start_iter`` on the
  loader it returns when resuming.
"""

import contextlib
import itertools
import random
from collections import defaultdict
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..checks import AnnotationSummary, CheckedMapper, scan_annotations

__all__ = ["ResumableBatchSampler", "ResumableTrainLoader", "build_resumable_train_loader"]


class ResumableBatchSampler:
    """This rank's training batches of ``(position, index)`` pairs, from batch ``start_iter`` on.

    ``index`` is the sample's index in the dataset and ``position`` its place in the infinite
    stream shared by all ranks (rank r takes positions r, r + world_size, ...), which identifies
    the sample's draw uniquely and seeds its augmentation (:meth:`sample_seed`).

    Args:
        size: number of samples in the dataset.
        batch_size: images per batch on this rank.
        group_ids: a group per sample (e.g. 0 for landscape, 1 for portrait images); each batch
            holds samples of one group, filled in stream order, as Detectron2's aspect-ratio
            grouping does. None: consecutive samples.
        shuffle: shuffle each pass over the dataset (Detectron2's TrainingSampler).
        seed: the stream's seed, the same on every rank; None draws one shared by all ranks.
        start_iter: the first batch to yield (the iteration a resumed run starts at).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        *,
        group_ids: Optional[Sequence[int]] = None,
        shuffle: bool = True,
        seed: Optional[int] = None,
        start_iter: int = 0,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        if group_ids is not None and len(group_ids) != size:
            raise ValueError(f"group_ids has {len(group_ids)} entries for {size} samples.")
        self.batch_size = batch_size
        self.group_ids = group_ids
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.start_iter = start_iter
        self._sampler = TrainingSampler(size, shuffle=shuffle, seed=self.seed)
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def sample_seed(self, position: int) -> int:
        """The seed of the sample at ``position`` of the stream (32 bits, well mixed)."""
        return int(np.random.SeedSequence((self.seed, position)).generate_state(1)[0])

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        return itertools.islice(self._batches(), self.start_iter, None)

    def _batches(self) -> Iterator[List[Tuple[int, int]]]:
        groups: Dict[int, List[Tuple[int, int]]] = defaultdict(list)
        # TrainingSampler yields this rank's share of the stream: positions rank + k * world.
        for k, index in enumerate(self._sampler):
            group = groups[0 if self.group_ids is None else self.group_ids[index]]
            group.append((self._rank + k * self._world_size, index))
            if len(group) == self.batch_size:
                yield group[:]
                group.clear()


@contextlib.contextmanager
def _seeded_rng(seed: int):
    """Seed torch's CPU generator, numpy's and ``random``'s inside; restore them on exit."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class _MappedBatches(IterableDataset):
    """The sampler's batches, mapped sample by sample under :func:`_seeded_rng`.

    In a DataLoader with W workers, worker w maps batches w, w + W, ...; the DataLoader returns
    them round-robin, so the order of batches does not depend on W.
    """

    def __init__(self, dataset, mapper: Callable, batch_sampler: ResumableBatchSampler):
        self.dataset, self.mapper, self.batch_sampler = dataset, mapper, batch_sampler

    def __iter__(self):
        batches = iter(self.batch_sampler)
        worker = get_worker_info()
        if worker is not None:
            batches = itertools.islice(batches, worker.id, None, worker.num_workers)
        for batch in batches:
            mapped = []
            for position, index in batch:
                with _seeded_rng(self.batch_sampler.sample_seed(position)):
                    data = self.mapper(self.dataset[index])
                # A mapper returns None to skip a sample (Detectron2's convention).
                if data is not None:
                    mapped.append(data)
            yield mapped


class ResumableTrainLoader:
    """An iterable of training batches (lists of mapped dicts) that can start at any iteration.

    Set :attr:`start_iter` before the first batch is drawn. ``iter()`` may be called earlier
    (Detectron2 v0.6's SimpleTrainer calls it in its constructor, before the checkpoint is
    loaded): the DataLoader and its workers only start when the first batch is requested.
    """

    def __init__(
        self,
        dataset,
        *,
        mapper: Callable,
        batch_sampler: ResumableBatchSampler,
        num_workers: int = 0,
    ):
        self.batch_sampler = batch_sampler
        self.annotation_summary: Optional[AnnotationSummary] = None
        self._loader = DataLoader(
            _MappedBatches(dataset, mapper, batch_sampler),
            batch_size=None,  # the sampler batches
            num_workers=num_workers,
            collate_fn=trivial_batch_collator,
            # Its own generator: creating the iterator must not draw from the global one.
            generator=torch.Generator(),
        )

    @property
    def start_iter(self) -> int:
        return self.batch_sampler.start_iter

    @start_iter.setter
    def start_iter(self, start_iter: int):
        self.batch_sampler.start_iter = start_iter

    def __iter__(self):
        yield from self._loader


def _train_loader_from_config(cfg, mapper=None, *, dataset=None):
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise ValueError(
            f"DATALOADER.SAMPLER_TRAIN = {cfg.DATALOADER.SAMPLER_TRAIN!r}: the resumable loader "
            "samples like 'TrainingSampler' only. Set it to 'TrainingSampler', or build "
            "Detectron2's build_detection_train_loader instead (its data order restarts when a "
            "run resumes)."
        )
    if dataset is None:
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
    return {
        "dataset": dataset,
        "mapper": DatasetMapper(cfg, True) if mapper is None else mapper,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
    }


@configurable(from_config=_train_loader_from_config)
def build_resumable_train_loader(
    dataset: List[dict],
    *,
    mapper: Callable,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    seed: Optional[int] = None,
    start_iter: int = 0,
) -> ResumableTrainLoader:
    """Detectron2's training loader, resumable: a drop-in for ``build_detection_train_loader``.

    Called with a yacs config (``build_resumable_train_loader(cfg)``) it reads the same keys.

    The dataset's boxes are checked first (:func:`rev_det.checks.scan_annotations`: an error for
    negative sizes, a warning with counts for boxes Detectron2 drops), and the mapper's errors
    name the image file (:class:`rev_det.checks.CheckedMapper`).

    Args:
        dataset: the dataset dicts (e.g. from ``get_detection_dataset_dicts``); with aspect-ratio
            grouping each needs "width" and "height".
        mapper: maps a dataset dict to the model's input (e.g. ``DatasetMapper``).
        total_batch_size: images per iteration over all ranks.
        aspect_ratio_grouping: batch landscape and portrait images separately.
        num_workers: data-loading worker processes; the batches do not depend on it.
        seed: see :class:`ResumableBatchSampler`. None (Detectron2's default) draws a seed shared
            by all ranks from numpy's global generator, which Detectron2's ``default_setup``
            seeds from ``SEED`` / ``train.seed``: keep that fixed for an exact resume.
        start_iter: the first iteration; the entry points set it on the loader when resuming.
    """
    world_size = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world_size:
        raise ValueError(
            f"Total batch size {total_batch_size} must be a positive multiple of the number of "
            f"processes ({world_size}); change SOLVER.IMS_PER_BATCH / "
            "dataloader.train.total_batch_size."
        )
    if not isinstance(dataset, list):
        raise TypeError(
            f"dataset must be a list of dataset dicts, got {type(dataset).__name__}; use "
            "detectron2.data.get_detection_dataset_dicts."
        )
    summary = scan_annotations(dataset)
    group_ids = None
    if aspect_ratio_grouping:
        try:
            # Detectron2's AspectRatioGroupedDataset: 0 for landscape, 1 for portrait and square.
            group_ids = [0 if d["width"] > d["height"] else 1 for d in dataset]
        except KeyError as e:
            raise ValueError(
                "Aspect-ratio grouping needs 'width' and 'height' in every dataset dict; add "
                "them, or turn the grouping off (DATALOADER.ASPECT_RATIO_GROUPING / "
                "aspect_ratio_grouping=False)."
            ) from e
    batch_sampler = ResumableBatchSampler(
        len(dataset),
        total_batch_size // world_size,
        group_ids=group_ids,
        seed=seed,
        start_iter=start_iter,
    )
    loader = ResumableTrainLoader(
        DatasetFromList(dataset, copy=False),
        mapper=CheckedMapper(mapper),
        batch_sampler=batch_sampler,
        num_workers=num_workers,
    )
    loader.annotation_summary = summary
    return loader
