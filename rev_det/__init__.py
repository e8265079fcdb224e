"""rev_det: reversible vision-transformer backbones for Detectron2.

Importing this package registers its backbones in Detectron2's BACKBONE_REGISTRY.
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

__version__ = "0.1.0"
