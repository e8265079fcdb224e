"""How the settings that messages name are spelled in each config system.

:class:`SettingNames` holds the names of the settings the checks' messages mention;
:data:`YACS` spells them as yacs configs do (``projects/train_net.py``), :data:`LAZY` as
LazyConfigs do (``projects/lazyconfig_train_net.py``). The other modules of the package
take one of them to word their errors.
"""

import dataclasses

__all__ = [
    "LAZY",
    "YACS",
    "SettingNames",
]


@dataclasses.dataclass(frozen=True)
class SettingNames:
    """How the settings that messages name are spelled in one config system."""

    output_dir: str
    weights: str
    num_classes: str
    base_lr: str
    warmup: str
    check_period: str
    check_threshold: str
    square_pad: str
    image_sizes: str


YACS = SettingNames(
    output_dir="OUTPUT_DIR",
    weights="MODEL.WEIGHTS",
    num_classes="MODEL.ROI_HEADS.NUM_CLASSES",
    base_lr="SOLVER.BASE_LR",
    warmup="SOLVER.WARMUP_ITERS",
    check_period="MODEL.REV.CHECK_RECONSTRUCTION.PERIOD",
    check_threshold="MODEL.REV.CHECK_RECONSTRUCTION.THRESHOLD",
    square_pad="MODEL.REV.SQUARE_PAD",
    image_sizes="INPUT.MAX_SIZE_TRAIN / INPUT.MAX_SIZE_TEST",
)
LAZY = SettingNames(
    output_dir="train.output_dir",
    weights="train.init_checkpoint",
    num_classes="model.roi_heads.num_classes",
    base_lr="optimizer.lr",
    warmup="lr_multiplier.warmup_length",
    check_period="train.check_reconstruction.period",
    check_threshold="train.check_reconstruction.threshold",
    square_pad="model.backbone.square_pad",
    image_sizes="dataloader.train/test.mapper.augmentations",
)
