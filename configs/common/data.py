"""Detectron2's COCO loaders as rev_det's LazyConfigs use them: RGB images, the resumable
training loader (``--resume`` continues with the batches an uninterrupted run would have seen),
and the fast COCO evaluator only where Detectron2's compiled ops exist."""

from detectron2 import model_zoo

from rev_det.data import build_resumable_train_loader
from rev_det.utils import detectron2_has_compiled_ops

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train._target_ = build_resumable_train_loader
dataloader.train.mapper.image_format = "RGB"
dataloader.evaluator.use_fast_impl = detectron2_has_compiled_ops()
