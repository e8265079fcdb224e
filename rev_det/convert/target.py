"""The target of a conversion: the RevViT / RevMViT trunk a rev_det config builds."""

from typing import Sequence, Tuple

import torch
from torch import nn

from ..modeling.rev_mvit import RevMViT
from ..modeling.rev_vit import RevViT
from .core import ConversionError

__all__ = ["build_target_trunk"]


def build_target_trunk(config_file: str, opts: Sequence[str] = ()) -> Tuple[nn.Module, str]:
    """Build the backbone of a rev_det config on the "meta" device (no memory, no
    initialisation cost) and find its RevViT / RevMViT trunk.

    Args:
        config_file: a yacs ``.yaml`` or a LazyConfig ``.py``.
        opts: overrides, ``KEY VALUE`` pairs (yacs) or ``key=value`` strings (LazyConfig).

    Returns:
        The trunk and its key prefix in the built Detectron2 model (e.g. ``backbone.net.``),
        so that ``{prefix}{key}`` loads with ``MODEL.WEIGHTS`` / ``train.init_checkpoint``.
    """
    from detectron2.config import LazyConfig, get_cfg, instantiate
    from detectron2.modeling import build_backbone

    from ..checks import check_lazy_overrides
    from ..config import add_revdet_config

    with torch.device("meta"):
        if config_file.endswith(".py"):
            cfg = LazyConfig.load(config_file)
            try:
                check_lazy_overrides(cfg, list(opts))
            except KeyError as e:
                raise ConversionError(e.args[0]) from e
            cfg = LazyConfig.apply_overrides(cfg, list(opts))
            if "backbone" not in cfg.model:
                raise ConversionError(f"{config_file}: cfg.model has no backbone.")
            backbone = instantiate(cfg.model.backbone)
        else:
            cfg = get_cfg()
            add_revdet_config(cfg)
            cfg.merge_from_file(config_file)
            cfg.merge_from_list(list(opts))
            backbone = build_backbone(cfg)
    trunks = [(n, mod) for n, mod in backbone.named_modules() if isinstance(mod, (RevViT, RevMViT))]
    if len(trunks) != 1:
        raise ConversionError(
            f"{config_file} builds a backbone with {len(trunks)} RevViT/RevMViT trunks; "
            "expected one (a rev_det config)."
        )
    name, trunk = trunks[0]
    # Detectron2's meta-architectures keep the backbone as `backbone`.
    return trunk, "backbone." + (name + "." if name else "")
