"""The source layouts by name, and the dispatch to their converters."""

from typing import Mapping

import torch
from torch import nn

from .core import ConversionError
from .mmpretrain import convert_mmpretrain_revvit
from .mvitv2 import convert_mvitv2
from .pyslowfast import convert_pyslowfast_revmvit, convert_pyslowfast_revvit
from .vit import convert_vit

__all__ = ["SOURCES", "convert_checkpoint"]


SOURCES = {
    "pyslowfast-revvit": convert_pyslowfast_revvit,
    "pyslowfast-revmvit": convert_pyslowfast_revmvit,
    "mmpretrain-revvit": convert_mmpretrain_revvit,
    "vit": convert_vit,
    "mvitv2": convert_mvitv2,
}


def convert_checkpoint(source: str, sd: Mapping[str, torch.Tensor], target: nn.Module):
    """Dispatch to the converter of ``source`` (one of :data:`SOURCES`)."""
    if source not in SOURCES:
        raise ConversionError(f"unknown source {source!r}; choose one of {sorted(SOURCES)}.")
    return SOURCES[source](sd, target)
