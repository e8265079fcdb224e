import os
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from rev_det.data import SHAPES_DATASETS, register_shapes_datasets

# Test modules import shared helpers from each other (e.g. test_engine.make_stack).
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def shapes_registered(tmp_path):
    """Register the shapes datasets at tmp_path; restore the default registration afterwards."""

    def unregister():
        for name in SHAPES_DATASETS:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
            if name in MetadataCatalog.list():
                MetadataCatalog.remove(name)

    unregister()
    register_shapes_datasets(str(tmp_path))
    yield str(tmp_path)
    unregister()
    register_shapes_datasets()  # what `import rev_det` registered
