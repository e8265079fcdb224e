"""Small layers that Detectron2 v0.6 lacks (Detectron2 main has equivalents)."""

from typing import Callable, Tuple, Union

import torch
from detectron2.layers import get_norm as d2_get_norm
from torch import nn

__all__ = ["LayerNorm2d", "get_norm", "resolve_norm"]


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an (N, C, H, W) tensor, as in ViTDet's pyramid and heads.

    Detectron2 v0.6's ``get_norm`` has no "LN"; this module is what "LN" means in rev_det.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op on a channels-last view: no extra (N, C, H, W) temporaries for the affine
        # part. The result keeps the input's memory format: (N, C, H, W)-contiguous for a
        # contiguous input (deconvolutions fed channels-last run much slower on CPU, and ViTDet's
        # pyramid feeds its norms' outputs to them), channels-last
        # for a channels-last input, where 3x3 convolutions run faster (the reversible pyramid's
        # coupling blocks, see pyramid.py).
        # The normalised shape is a constant (not x.shape), so that ONNX export sees no shape op.
        y = nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps
        )
        return _channels_first(y, x)

    def forward_with_statistics(
        self, x: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward`, and each pixel's mean and reciprocal standard deviation over the
        channels, (N, 1, H, W), exactly those the output was normalised with (one fused op).

        Returns:
            The output (as :meth:`forward`'s), mean, rstd.
        """
        y, mean, rstd = torch.native_layer_norm(
            x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps
        )
        return _channels_first(y, x), mean.permute(0, 3, 1, 2), rstd.permute(0, 3, 1, 2)

    def inverse(
        self,
        y: torch.Tensor,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        chunks: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> Tuple[torch.Tensor, ...]:
        """The input of ``y = self(x)`` from ``y`` and :meth:`forward_with_statistics`' mean and
        rstd: ``x = (y - bias) / weight / rstd + mean``.

        A weight near zero amplifies the rounding of ``y`` by up to std / |weight|: the caller
        decides whether to trust the inverse (the reversible pyramid checks |weight| first).

        Returns:
            x split into ``chunks`` groups of channels (as ``x.chunk(chunks, dim=1)``), each a
            new dense tensor in ``memory_format``.
        """
        groups = zip(y.chunk(chunks, dim=1), self.weight.chunk(chunks), self.bias.chunk(chunks))
        return tuple(
            part.to(memory_format=memory_format, copy=True)
            .sub_(bias[:, None, None])
            .div_(weight[:, None, None])
            .div_(rstd)
            .add_(mean)
            for part, weight, bias in groups
        )


def _channels_first(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The (N, H, W, C) result ``y`` of a norm of ``x`` as (N, C, H, W) in ``x``'s memory format."""
    return y.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last when the channels are ``x``'s innermost dimension (also for a slice of
    channels of a channels-last tensor, which is not dense), else contiguous."""
    channels_last = x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1 and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def get_norm(norm: Union[str, Callable[[int], nn.Module], None], out_channels: int):
    """Detectron2's ``get_norm`` plus "LN" (channels-first LayerNorm) on every Detectron2 version.

    Args:
        norm: "LN", any name Detectron2's ``get_norm`` knows ("BN", "GN", "SyncBN", ...), a
            callable that takes the channel count and returns a module, or ""/None for none.
        out_channels: number of channels the norm acts on.
    """
    if norm == "LN":
        return LayerNorm2d(out_channels)
    return d2_get_norm(norm, out_channels)


def resolve_norm(norm: Union[str, Callable[[int], nn.Module], None]):
    """What to pass as ``norm`` to Detectron2's own layers (e.g. its FPN): "LN" becomes
    :class:`LayerNorm2d`, which Detectron2 v0.6 does not know by name; anything else as is."""
    return LayerNorm2d if norm == "LN" else norm
