"""Convert published ImageNet checkpoints into rev_det trunk weights.

One converter per source layout. Each takes the source state dict and the target trunk (a
:class:`~rev_det.modeling.RevViT` or :class:`~rev_det.modeling.RevMViT`; it may live on the
"meta" device, only its parameter names and shapes are read) and returns a :class:`Conversion`:
the trunk's state dict as far as the source fills it, and an account of every key. A conversion
with missing or dropped keys (named groups, :data:`PARTIAL_GROUPS`) is an initialisation of the
rev_det model, not the source model.

Modules (in the layouts, ``i`` is the block index, C the block width, d the head width, 2C the
two streams concatenated):
    core: the key mapping, its check against the target, the partial groups and the report.
    pyslowfast: ``pyslowfast-revvit`` / ``pyslowfast-revmvit``, the official Rev-ViT and
        Rev-MViT.
    mmpretrain: ``mmpretrain-revvit``, mmpretrain's ``RevVisionTransformer``.
    vit: ``vit``, a plain ViT in timm's layout (MAE, DeiT, timm).
    mvitv2: ``mvitv2``, MViTv2 (facebookresearch/mvit, Detectron2's ImageNet files).
    sources: :data:`SOURCES` (name -> converter) and :func:`convert_checkpoint`.
    target: :func:`build_target_trunk`, the trunk a config builds.
    io: reading checkpoint files, writing the converted weights for Detectron2.
"""

from .core import PARTIAL_GROUPS, Conversion, ConversionError
from .io import extract_state_dict, load_checkpoint_file, save_detectron2_checkpoint
from .mmpretrain import convert_mmpretrain_revvit
from .mvitv2 import convert_mvitv2
from .pyslowfast import convert_pyslowfast_revmvit, convert_pyslowfast_revvit
from .sources import SOURCES, convert_checkpoint
from .target import build_target_trunk
from .vit import convert_vit

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
