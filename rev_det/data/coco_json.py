"""Your own COCO-format datasets, registered by name from the config (no code).

yacs: ``DATASETS.COCO_INSTANCES``; LazyConfig: ``train.coco_instances``. Each entry is
``[name, json_file, image_root]``: a COCO instances json (``images``, ``annotations`` with
``bbox`` and, for Mask R-CNN, ``segmentation``; ``categories``) and the folder its
``file_name`` paths are relative to. The entry points register them before anything reads a
dataset, in every process, as Detectron2's ``register_coco_instances`` would (the COCO
evaluator reads the same json); then ``DATASETS.TRAIN`` / ``TEST`` (LazyConfig:
``dataloader.train.dataset.names``) name them like any dataset.
"""

import json
import os
from typing import Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

__all__ = ["register_coco_datasets"]


def _load(json_file: str, image_root: str, name: str):
    try:
        return load_coco_json(json_file, image_root, name)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Dataset {name!r}: {json_file} is not valid JSON ({error}); is it truncated? "
            "Write it again or point the dataset at a complete COCO instances file."
        ) from None


def register_coco_datasets(entries: Sequence[Sequence[str]], key: str) -> None:
    """Register each ``[name, json_file, image_root]`` of ``entries`` as a COCO-format dataset.

    An entry registered before with the same files is left as it is (the entry points load the
    config more than once in a process).

    Args:
        entries: the config's list.
        key: the config key, named in errors.

    Raises:
        ValueError: an entry that is not three strings, a json or folder that does not exist,
            or a name already registered for other data (e.g. Detectron2's builtin
            ``coco_2017_train``).
    """
    for entry in entries:
        if len(entry) != 3 or not all(isinstance(x, str) and x for x in entry):
            raise ValueError(
                f"{key}: {list(entry)!r} is not [name, json_file, image_root] (three non-empty "
                'strings), e.g. ["my_train", "data/train.json", "data/images"].'
            )
        name, json_file, image_root = entry
        if not os.path.isfile(json_file):
            raise ValueError(f"{key}: dataset {name!r}: no json file {json_file}.")
        if not os.path.isdir(image_root):
            raise ValueError(f"{key}: dataset {name!r}: no image folder {image_root}.")
        metadata = MetadataCatalog.get(name)
        if name in DatasetCatalog.list():
            if (
                metadata.get("json_file", None) == json_file
                and metadata.get("image_root", None) == image_root
            ):
                continue
            raise ValueError(
                f"{key}: dataset name {name!r} is already registered for other data (a "
                "Detectron2 builtin or another entry); give yours another name."
            )
        DatasetCatalog.register(name, lambda j=json_file, r=image_root, n=name: _load(j, r, n))
        metadata.set(json_file=json_file, image_root=image_root, evaluator_type="coco")
