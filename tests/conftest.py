import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from rev_det.data import (
    SHAPES_DATASETS,
    SHAPES_TEST_DATASET,
    ensure_shapes_dataset,
    register_shapes_datasets,
)


@pytest.fixture
def shapes_registered(tmp_path):
    """Register the shapes datasets at tmp_path; restore the default registration afterwards."""

    def unregister():
        for name in SHAPES_DATASETS + (SHAPES_TEST_DATASET,):
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
            if name in MetadataCatalog.list():
                MetadataCatalog.remove(name)

    unregister()
    register_shapes_datasets(str(tmp_path))
    yield str(tmp_path)
    unregister()
    register_shapes_datasets()  # what `import rev_det` registered


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    """A small shapes dataset (24 train, 6 val images) in a temporary directory, per module."""
    root = str(tmp_path_factory.mktemp("datasets"))
    ensure_shapes_dataset(root, num_train=24, num_val=6)
    return root
