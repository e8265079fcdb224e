"""Convert published ImageNet checkpoints into rev_det trunk weights (see :mod:`.core`)."""

from .core import (
    PARTIAL_GROUPS,
    SOURCES,
    Conversion,
    ConversionError,
    build_target_trunk,
    convert_checkpoint,
    convert_mmpretrain_revvit,
    convert_mvitv2,
    convert_pyslowfast_revmvit,
    convert_pyslowfast_revvit,
    convert_vit,
    extract_state_dict,
    load_checkpoint_file,
    save_detectron2_checkpoint,
)

__all__ = [
    "SOURCES",
    "PARTIAL_GROUPS",
    "Conversion",
    "ConversionError",
    "convert_pyslowfast_revvit",
    "convert_pyslowfast_revmvit",
    "convert_mmpretrain_revvit",
    "convert_vit",
    "convert_mvitv2",
    "convert_checkpoint",
    "extract_state_dict",
    "load_checkpoint_file",
    "build_target_trunk",
    "save_detectron2_checkpoint",
]
