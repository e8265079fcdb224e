"""RevViTDet: Detectron2's ViTDet ViT as a reversible surrogate of itself (Dr2Net-style).

Pretrained ViTs (MAE, ViTDet's COCO detectors) are residual networks: ``x + A(x)``, then
``x + M(x)``. RevViTDet keeps their sub-blocks and names, and runs them on two streams with a
:class:`~rev_det.reversible.ScaledCoupling` per block::

    p ──────────────┐ beta                         q ──────────────┐ beta
    q ──┬── A ──(+)─┴──(+)── r                     r ──┬── M ──(+)─┴──(+)── s
        └─alpha──┘                                     └─alpha──┘

    r = beta p + alpha q + A(q)            s = beta q + alpha r + M(r)

* ``(alpha, beta) = (1, 0)``: ``s = block(q)``, the pretrained ViT block; ``p`` is ignored. With
  both streams starting as the patch tokens, the last stream is ViTDet's output exactly.
* ``(0, 1)``: RevViT's additive coupling, whose inverse is as precise as RevViT's.
* in between: invertible whenever ``beta != 0``; the inverse divides by ``beta``.

A schedule (:class:`rev_det.training.CouplingSchedule`) moves the coefficients from the first
setting towards the second during fine-tuning. Until they allow a precise inverse
(``reversible_at``), a trunk asked for ``backprop="reversible"`` runs ``"checkpoint"`` (exact at
any coefficients) and switches by itself, with a log line.
"""

import logging
from functools import partial
from typing import Any, Dict, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from torch import nn

from ..reversible import BackpropModule, ReversibleSequence, ScaledCoupling
from .attention import init_vit_weights
from .rev_vit import RevViTBlock, ViTTokens, check_vit_args, vit_blocks, vit_trunk_args
from .trunk import TwoStreamTrunk
from .trunk_args import backprop_args

__all__ = ["RevViTDet", "DualResidualBlock", "REVERSIBLE_AT"]

logger = logging.getLogger(__name__)

# Where backprop="reversible" starts (alpha at most, beta at least): RevViT's coupling itself.
# Reversible gradients must stay within the tolerance reversible mode is held to (float32, 1e-4
# relative to autograd's); tools/coupling_precision.py measured ViT-B at 1024 within it from about
# (0.05, 0.95), but ViT-L already beyond it at (0.1, 0.9) (docs/vitdet_surrogate.md, "Precision").
REVERSIBLE_AT = (0.0, 1.0)


class DualResidualBlock(RevViTBlock):
    """A ViTDet block as a two-stream block with a scaled coupling.

    F = norm1 + attention, G = norm2 + MLP, as in :class:`RevViTBlock` (and named as in
    Detectron2's ``Block``); ``coupling`` (a :class:`~rev_det.reversible.ScaledCoupling`) holds the
    block's ``alpha`` and ``beta`` (see the module docstring).

    Args:
        alpha, beta: the coupling's starting coefficients.
        **kwargs: :class:`RevViTBlock`'s arguments.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.coupling = ScaledCoupling(alpha, beta)


class RevViTDet(TwoStreamTrunk, ViTTokens):
    """Detectron2's ``ViT`` (ViTDet's plain backbone) as a two-stream reversible network.

    Same constructor arguments, parameter names (``patch_embed.proj``, ``pos_embed``,
    ``blocks.{i}.norm1``, ``attn.qkv``, ``attn.proj``, ``attn.rel_pos_h/w``, ``norm2``,
    ``mlp.fc1/fc2``) and output (``last_feat``: (B, C, H / p, W / p), the last stream) as
    Detectron2's ``ViT``, so ViTDet's configs, its pyramid and its checkpoints (MAE, ViTDet's COCO
    detectors) work unchanged; at ``(alpha, beta) = (1, 0)`` it computes ViT's function. See the
    module docstring for the coupling and ``docs/vitdet_surrogate.md`` for the schedule.

    As a :class:`TwoStreamTrunk` its fusion is the last stream (C channels, ViT's output), so
    rev_det's reversible pyramid also takes it, at the stream width.

    Args:
        img_size: input size the global blocks' relative position tables are sized for.
        patch_size: patch size (stride of the output).
        in_chans: number of input image channels.
        embed_dim: token width C.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width over embed_dim.
        qkv_bias: bias in the query, key and value projections.
        drop_path_rate: stochastic depth rate of the last block (linear from 0).
        norm_layer: normalisation of the blocks.
        act_layer: MLP activation.
        use_abs_pos: add absolute position embeddings (from a pre-training grid, resized).
        use_rel_pos: add decomposed relative position bias in attention.
        window_size: window size of window-attention blocks.
        window_block_indexes: indexes of blocks using window attention.
        residual_block_indexes: ViTDet's optional convolutional blocks; not supported (must be
            empty, as in every ViTDet config).
        pretrain_img_size: image size of the pre-training grid of ``pos_embed``.
        pretrain_use_cls_token: whether ``pos_embed`` has a class-token entry (dropped).
        stem_channels: channels of a convolutional stem before the patch projection (see
            :class:`~rev_det.modeling.rev_vit.PatchEmbed`; not in ViTDet); () for ViT's patch
            embedding.
        stem_norm: normalisation of the stem's convolutions.
        alpha, beta: the coupling's coefficients at construction (a schedule moves them).
        reversible_at: ``(max alpha, min beta)`` from which ``backprop="reversible"`` rebuilds
            the blocks' inputs; below it such a trunk runs ``"checkpoint"``.
        backprop: "reversible", "autograd" or "checkpoint" (see :mod:`rev_det.reversible`).
        parallel_backward: on CUDA, overlap rebuilding and back-propagation of the blocks.
        out_feature: name of the output feature.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        window_size: int = 0,
        window_block_indexes: Sequence[int] = (),
        residual_block_indexes: Sequence[int] = (),
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        stem_channels: Sequence[int] = (),
        stem_norm: str = "FrozenBN",
        alpha: float = 1.0,
        beta: float = 0.0,
        reversible_at: Tuple[float, float] = REVERSIBLE_AT,
        backprop: str = "reversible",
        parallel_backward: bool = False,
        out_feature: str = "last_feat",
    ):
        super().__init__()
        check_vit_args(depth, num_heads, embed_dim, window_size, window_block_indexes)
        if residual_block_indexes:
            raise ValueError(
                f"residual_block_indexes {list(residual_block_indexes)}: RevViTDet has no "
                "convolutional residual blocks (ViTDet's ResBottleneckBlock); leave it empty, as "
                "ViTDet's COCO configs do."
            )
        self.reversible_at = tuple(reversible_at)
        self._init_tokens(
            patch_size,
            in_chans,
            embed_dim,
            stem_channels,
            stem_norm,
            use_abs_pos,
            pretrain_img_size,
            pretrain_use_cls_token,
        )
        blocks = vit_blocks(
            DualResidualBlock,
            img_size // patch_size,
            depth,
            drop_path_rate,
            window_size,
            window_block_indexes,
            alpha=alpha,
            beta=beta,
            dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            norm_layer=norm_layer,
            act_layer=act_layer,
            use_rel_pos=use_rel_pos,
        )
        self.blocks = ReversibleSequence(blocks, backprop, parallel_backward)
        self.backprop = backprop
        self._running = None  # the mode the last training forward ran, for the switch's log line

        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}
        init_vit_weights(self, self.pos_embed)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> Dict[str, Any]:
        """The constructor arguments from ``cfg.MODEL.REVVIT`` (the ViT's shape and stem, as for
        RevViT), ``cfg.MODEL.REV.COUPLING`` (the coefficients' start and the reversible
        threshold) and ``cfg.MODEL.REV`` (backprop).

        Args:
            cfg: a Detectron2 config with rev_det's keys.
            input_shape: the images' shape; its ``channels`` is ``in_chans``.

        Returns:
            dict: keyword arguments of :class:`RevViTDet`.
        """
        coupling = cfg.MODEL.REV.COUPLING
        return dict(
            in_chans=input_shape.channels,
            **vit_trunk_args(cfg),
            stem_channels=tuple(cfg.MODEL.REVVIT.STEM_CHANNELS),
            stem_norm=cfg.MODEL.REVVIT.STEM_NORM,
            alpha=coupling.ALPHA[0],
            beta=coupling.BETA[0],
            reversible_at=tuple(coupling.REVERSIBLE_AT),
            **backprop_args(cfg),
        )

    @property
    def size_divisibility(self) -> int:
        return self.patch_size

    def couplings(self) -> Tuple[ScaledCoupling, ...]:
        """The blocks' couplings, in order."""
        return tuple(block.coupling for block in self.blocks)

    def running_backprop(self) -> str:
        """The mode a training forward runs now: ``backprop``, except ``"reversible"`` before the
        coefficients reach ``reversible_at``, where it is ``"checkpoint"``."""
        if self.backprop != "reversible":
            return self.backprop
        couplings = self.couplings()
        alphas = torch.stack([c.alpha for c in couplings])
        betas = torch.stack([c.beta for c in couplings])
        alpha, beta = torch.stack([alphas.max(), betas.min()]).tolist()  # one host sync
        max_alpha, min_beta = self.reversible_at
        return "reversible" if alpha <= max_alpha and beta >= min_beta else "checkpoint"

    # The requested mode, stored here: the blocks run the mode the coefficients allow
    # (running_backprop), set each training forward.
    backprop = BackpropModule.backprop

    @property
    def stream_channels(self) -> int:
        return self._out_feature_channels[self._out_features[0]]

    def forward_streams(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The two streams after the last block, each (B, C, H / p, W / p)."""
        x = self.tokens(x)
        # Outside training nothing is rebuilt: the coefficients need not be read then.
        recompute = self.recomputes()
        self.blocks.backprop = self._switch(self.running_backprop()) if recompute else self.backprop
        r, s = self.blocks(x, x)
        return r.permute(0, 3, 1, 2), s.permute(0, 3, 1, 2)

    def fuse(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """ViT's output: the last stream (at (1, 0) the first holds only the last attention's
        residual sum, which the pretrained network never output)."""
        return x2

    def _switch(self, mode: str) -> str:
        """``mode``, logged when it is not the mode the last training forward ran (or, at the
        first, when it is not the requested one)."""
        if mode != self._running:
            if self._running is not None or mode != self.backprop:
                alpha, beta = self.couplings()[0].alpha, self.couplings()[0].beta
                logger.info(
                    "RevViTDet back-propagates with %r at alpha=%.4g, beta=%.4g (requested %r; "
                    "reversible from alpha <= %g and beta >= %g).",
                    mode,
                    float(alpha),
                    float(beta),
                    self.backprop,
                    *self.reversible_at,
                )
            self._running = mode
        return mode
