"""rev_det: reversible vision-transformer backbones for Detectron2.

``import rev_det`` registers the backbones in Detectron2's BACKBONE_REGISTRY
(``build_rev_vit_backbone``), the embedded shapes datasets in DatasetCatalog and the
``rev_det://`` names of its shipped weights (:mod:`rev_det.model_zoo`); call
``add_revdet_config(cfg)`` before merging a yacs file that uses rev_det's keys.
"""

try:
    import detectron2  # noqa: F401
except ImportError as e:
    raise ImportError(
        "rev_det needs Detectron2 (>= 0.6), which has no wheel on the package index. Run "
        "`make setup` in the rev_det checkout (it builds Detectron2 v0.6 with "
        "tools/build_detectron2.py), or install Detectron2 from source "
        "(https://detectron2.readthedocs.io/en/latest/tutorials/install.html)."
    ) from e

from . import model_zoo  # noqa: F401  (resolves rev_det:// weight names)
from . import modeling  # noqa: F401  (registers the backbones)
from .config import add_revdet_config
from .data import register_shapes_datasets

register_shapes_datasets()

__version__ = "0.1.0"
__all__ = ["add_revdet_config", "model_zoo", "modeling", "register_shapes_datasets"]
