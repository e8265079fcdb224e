"""What only the demo uses: the synthetic shapes dataset and the trunk pretraining.

* :mod:`rev_det.demo.shapes`: the embedded COCO-format ``revdet_shapes`` datasets and their
  generator (``import rev_det`` registers the datasets; :mod:`rev_det.data` re-exports their
  names).
* :mod:`rev_det.demo.pretrain`: pretraining a detector's trunk on the generator's images
  (``tools/pretrain_trunk.py``). Its function :func:`~rev_det.demo.pretrain.pretrain` is not
  re-exported here, where ``rev_det.demo.pretrain`` names the module.
"""

from . import pretrain, shapes
from .pretrain import (
    PretrainSchedule,
    ShapesPretrainHead,
    ShapesSegmentation,
    build_head,
    detector_trunk,
    export_trunk,
    trainable_norms,
)
from .shapes import (
    SHAPES_CATEGORIES,
    SHAPES_DATASETS,
    SHAPES_TEST_DATASET,
    SHAPES_TEST_SIZE,
    draw_shapes_sample,
    ensure_shapes_dataset,
    ensure_shapes_stream,
    register_shapes_datasets,
    shapes_dataset_dir,
)

__all__ = [
    "SHAPES_CATEGORIES",
    "SHAPES_DATASETS",
    "SHAPES_TEST_DATASET",
    "SHAPES_TEST_SIZE",
    "PretrainSchedule",
    "ShapesPretrainHead",
    "ShapesSegmentation",
    "build_head",
    "detector_trunk",
    "draw_shapes_sample",
    "ensure_shapes_dataset",
    "ensure_shapes_stream",
    "export_trunk",
    "pretrain",
    "register_shapes_datasets",
    "shapes",
    "shapes_dataset_dir",
    "trainable_norms",
]
