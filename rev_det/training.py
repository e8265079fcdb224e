"""Training reversible models with Detectron2: mixed precision on any device, and a watch on the
reconstruction.

* :class:`RevAMPTrainer`: Detectron2's AMPTrainer on the model's device (CUDA or CPU), in
  float16 (with loss scaling) or bfloat16.
* :class:`ReconstructionCheck`: a hook that every N iterations measures how far the block inputs
  that the reversible backward rebuilds drift from the true ones, logs it, and stops training
  with a clear error when the drift is too large or not finite.
* :class:`CouplingSchedule`: a hook that sets the scaled couplings' ``alpha`` and ``beta``
  (RevViTDet) before every iteration.
"""

import contextlib
import logging
import math
import time
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.engine import AMPTrainer, HookBase
from detectron2.utils import comm
from detectron2.utils.logger import log_first_n
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .modeling import RevViTDet
from .reversible import (
    ReconstructionError,
    ScaledCoupling,
    SequenceInput,
    describe_block,
    name_reversible_blocks,
    record_sequence_inputs,
)

__all__ = ["CouplingSchedule", "RevAMPTrainer", "ReconstructionCheck", "parse_precision"]

logger = logging.getLogger(__name__)

PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_precision(precision: Union[str, torch.dtype]) -> torch.dtype:
    """The autocast dtype named by ``precision`` ("float16" or "bfloat16", or the dtype)."""
    if isinstance(precision, torch.dtype) and precision in PRECISIONS.values():
        return precision
    if isinstance(precision, str) and precision in PRECISIONS:
        return PRECISIONS[precision]
    raise ValueError(
        f"AMP precision {precision!r} is not valid; choose 'float16' (with loss scaling) or "
        "'bfloat16' (yacs: SOLVER.AMP.PRECISION; LazyConfig: train.amp.precision)."
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


class RevAMPTrainer(AMPTrainer):
    """Detectron2's AMPTrainer on the model's device, in float16 or bfloat16.

    Detectron2 v0.6's AMPTrainer requires CUDA and autocasts to float16 only. This one autocasts
    on the device type of the model's parameters (CUDA or CPU) to ``precision``:

    * float16: the loss is scaled by a GradScaler against gradient underflow, and steps with
      non-finite gradients are skipped while the scale adapts, as in Detectron2;
    * bfloat16: it has float32's exponent range, so there is no scaling (the scaler is created
      disabled, so that checkpoints keep AMPTrainer's format).

    Everything else is Detectron2's: the step, the metrics, the FloatingPointError on a
    non-finite loss, the scaler's state in checkpoints. Reversible blocks re-run in backward
    in the forward's autocast dtype (the engine replays the autocast state).

    Args:
        model, data_loader, optimizer: as for Detectron2's SimpleTrainer.
        precision: "float16" or "bfloat16" (or the torch dtype).
        grad_scaler: a GradScaler to use instead of the default one.
    """

    @configurable
    def __init__(
        self,
        model: nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        precision: Union[str, torch.dtype] = "float16",
        grad_scaler=None,
    ):
        precision = parse_precision(precision)
        device_type = next(model.parameters()).device.type
        _check_autocast(device_type, precision)
        if grad_scaler is None:
            grad_scaler = _grad_scaler(device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=grad_scaler)
        self.precision, self.device_type = precision, device_type

    @classmethod
    def from_config(cls, cfg, model, data_loader, optimizer):
        return {
            "model": model,
            "data_loader": data_loader,
            "optimizer": optimizer,
            "precision": cfg.SOLVER.AMP.PRECISION,
        }

    def run_step(self):
        # Detectron2's AMPTrainer.run_step, with the autocast device and dtype chosen above.
        assert self.model.training, "[RevAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())

        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()

        self._write_metrics(loss_dict, data_time)

        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


def _grad_scaler(device_type: str, enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler(device_type, enabled=enabled)
    if device_type == "cuda" or not enabled:
        return torch.cuda.amp.GradScaler(enabled=enabled)
    raise ValueError("float16 training on CPU needs torch >= 2.3; use AMP precision 'bfloat16'.")


def _check_autocast(device_type: str, dtype: torch.dtype):
    if hasattr(torch.amp, "is_autocast_available") and not torch.amp.is_autocast_available(
        device_type
    ):
        raise ValueError(f"torch has no autocast for {device_type!r} models; train without AMP.")
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"This GPU ({torch.cuda.get_device_name()}) has no bfloat16 support (it needs "
            "Ampere or newer); use AMP precision 'float16'."
        )


class ReconstructionCheck(HookBase):
    """Every ``period`` iterations, measure how far the reversible backward's rebuilt inputs drift.

    In a checked iteration, every reversible sequence that runs with ``backprop="reversible"``
    records its input (:func:`rev_det.reversible.record_sequence_inputs`). After the step, each
    one is run forward again from that input, with the updated weights and in the autocast
    state of training, and its blocks' inputs are rebuilt from its output by the backward's own
    steps (:func:`rev_det.reversible.measure_reconstruction`; no gradients, and the random
    generators are left as they were, so the check does not change training).

    Logged to the event storage at that iteration (the max and the mean over workers):

    * ``reversible/max_rel_error``: the largest ``max |X' - X| / max |X|`` of any rebuilt block
      input X' against the true input X;
    * ``reversible/mean_rel_error``: ``mean |X' - X| / mean |X|``, averaged over all blocks.

    Raises :class:`rev_det.reversible.ReconstructionError` (a FloatingPointError) naming the
    block where the drift starts if the max error exceeds ``threshold`` or is not finite. Measured drift at ViT-B width
    is in ``benchmarks/reconstruction_drift``.

    Cost of a checked iteration: one more forward and inversion of the reversible blocks without
    gradients, and meanwhile every block's input (two streams) is kept, and each sequence's
    input from the forward until the end of the step.

    Args:
        period: check every ``period`` iterations; 0 disables the check.
        threshold: the largest max relative error accepted.
    """

    @configurable
    def __init__(self, *, period: int = 0, threshold: float = 0.1):
        if period < 0:
            raise ValueError(
                f"The reconstruction check's period must be >= 0 (0 disables the check), got "
                f"{period} (yacs: MODEL.REV.CHECK_RECONSTRUCTION.PERIOD; LazyConfig: "
                "train.check_reconstruction.period)."
            )
        if not threshold > 0:
            raise ValueError(
                f"The reconstruction check's threshold must be positive, got {threshold} (yacs: "
                "MODEL.REV.CHECK_RECONSTRUCTION.THRESHOLD; LazyConfig: "
                "train.check_reconstruction.threshold)."
            )
        self.period, self.threshold = period, threshold
        self._recording = contextlib.ExitStack()
        self._records: Optional[List[SequenceInput]] = None

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.REV.CHECK_RECONSTRUCTION
        return {"period": c.PERIOD, "threshold": c.THRESHOLD}

    def before_train(self):
        if self.period:
            name_reversible_blocks(_unwrap(self.trainer.model))  # for the error message

    def before_step(self):
        if self.period and (self.trainer.iter + 1) % self.period == 0:
            self._records = self._recording.enter_context(record_sequence_inputs())

    def after_step(self):
        if self._records is None:
            return
        records, self._records = self._records, None
        self._recording.close()
        if records:
            self._check(records)
        else:
            log_first_n(
                logging.WARNING,
                "ReconstructionCheck: no reversible sequence runs with backprop='reversible', so "
                "there is no reconstruction to check.",
                name=__name__,
            )

    def after_train(self):
        self._records = None
        self._recording.close()

    def _check(self, records: List[SequenceInput]):
        worst, worst_block, first_bad, means = -1.0, "", "", []
        for record in records:
            errors = record.measure()
            # A nan compares as nothing; count it as the largest error.
            max_errors = torch.nan_to_num(errors[:, 0], nan=math.inf).tolist()
            index = int(np.argmax(max_errors))
            if max_errors[index] > worst:
                worst = max_errors[index]
                worst_block = describe_block(record.blocks[index], index, len(record.blocks))
            # Blocks are rebuilt from the last to the first and inherit the error of the blocks
            # after them: the culprit is the last block over the threshold.
            bad = [i for i, e in enumerate(max_errors) if not e <= self.threshold]
            if bad and not first_bad:
                first_bad = describe_block(record.blocks[bad[-1]], bad[-1], len(record.blocks))
            means.extend(errors[:, 1].tolist())
        # Every worker checks its own batch; all of them log and decide on the same numbers.
        results = comm.all_gather((worst, float(np.mean(means)), worst_block, first_bad))
        worst, worst_block, first_bad = max((r[0], r[2], r[3]) for r in results)
        mean = float(np.mean([r[1] for r in results]))
        storage = self.trainer.storage
        storage.put_scalar("reversible/max_rel_error", worst, smoothing_hint=False)
        storage.put_scalar("reversible/mean_rel_error", mean, smoothing_hint=False)
        logger.info(
            "Reconstruction at iteration %d: max relative error %.2e (%s), mean %.2e.",
            self.trainer.iter,
            worst,
            worst_block,
            mean,
        )
        if math.isfinite(worst) and worst <= self.threshold:
            return
        if math.isfinite(worst):
            amount = (
                f"off by up to {worst:.2e} (max relative error, at {worst_block}), above the "
                f"threshold {self.threshold:g} (MODEL.REV.CHECK_RECONSTRUCTION.THRESHOLD)"
            )
        else:
            amount = f"not finite (at {worst_block})"
        raise ReconstructionError(
            f"Reconstruction check at iteration {self.trainer.iter}: block inputs rebuilt from "
            f"their sequence's output, as the reversible backward does, are {amount}, so "
            f"gradients computed from them are not reliable. It starts at {first_bad}: blocks "
            "are rebuilt from the last to the first, and the blocks before it inherit its error. "
            "What to do: train in float32, or in float16 rather than bfloat16 (it rounds less); "
            "lower the learning rate; or back-propagate with MODEL.REV.BACKPROP = 'checkpoint' "
            "(the same model with exact gradients, for more memory)."
        )


class CouplingSchedule(HookBase):
    """Before every iteration, set every :class:`~rev_det.reversible.ScaledCoupling` of the model
    to the schedule's ``(alpha, beta)``; log them to the event storage (``coupling/alpha``,
    ``coupling/beta``).

    The coefficients move linearly from ``(alpha[0], beta[0])`` to ``(alpha[1], beta[1])``
    between the iterations ``ramp[0] * max_iter`` and ``ramp[1] * max_iter``, and stay at either
    end outside. They depend on the iteration alone, so a resumed run sets them exactly as the
    uninterrupted one (they are saved in checkpoints too, for evaluation). A model without
    scaled couplings is left alone. Both entry points register it (yacs: ``MODEL.REV.COUPLING``;
    LazyConfig: ``train.coupling``).

    Args:
        max_iter: the run's iterations (``SOLVER.MAX_ITER``, ``train.max_iter``).
        alpha: (start, end) of the factor on the stream each function reads.
        beta: (start, end) of the factor on the stream each function updates. An end at 0 keeps
            the pretrained ViT's function (a baseline trained with "autograd" or "checkpoint");
            with a trunk that asks for "reversible" it is an error, since the couplings could
            never be inverted.
        ramp: (start, end) of the ramp, fractions of ``max_iter``.
    """

    @configurable
    def __init__(
        self,
        *,
        max_iter: int,
        alpha: Sequence[float] = (1.0, 0.0),
        beta: Sequence[float] = (0.0, 1.0),
        ramp: Sequence[float] = (0.0, 0.1),
        keys: Tuple[str, str, str] = ("alpha", "beta", "ramp"),
    ):
        names = dict(zip(("alpha", "beta", "ramp"), keys))
        for name, value in (("alpha", alpha), ("beta", beta), ("ramp", ramp)):
            if len(value) != 2:
                raise ValueError(f"{names[name]} = {tuple(value)}: give two numbers, (start, end).")
        if not 0 <= ramp[0] <= ramp[1] <= 1:
            raise ValueError(
                f"{names['ramp']} = {tuple(ramp)}: give fractions of the run, "
                "0 <= start <= end <= 1."
            )
        self.alpha, self.beta = tuple(map(float, alpha)), tuple(map(float, beta))
        self._beta_key = names["beta"]
        self.first, self.last = (round(f * max_iter) for f in ramp)
        self._couplings: List[ScaledCoupling] = []

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.REV.COUPLING
        keys = tuple(f"MODEL.REV.COUPLING.{k}" for k in ("ALPHA", "BETA", "RAMP"))
        return dict(
            max_iter=cfg.SOLVER.MAX_ITER, alpha=c.ALPHA, beta=c.BETA, ramp=c.RAMP, keys=keys
        )

    def values(self, iteration: int) -> Tuple[float, float]:
        """``(alpha, beta)`` at ``iteration``."""
        if iteration >= self.last:
            t = 1.0
        elif iteration <= self.first:
            t = 0.0
        else:
            t = (iteration - self.first) / (self.last - self.first)
        return tuple(start + t * (end - start) for start, end in (self.alpha, self.beta))

    def before_train(self):
        model = _unwrap(self.trainer.model)
        self._couplings = [m for m in model.modules() if isinstance(m, ScaledCoupling)]
        if self._couplings and self.beta[1] == 0:
            trunks = [m for m in model.modules() if isinstance(m, RevViTDet)]
            if any(trunk.backprop == "reversible" for trunk in trunks):
                raise ValueError(
                    f"{self._beta_key} = {self.beta} ends at 0 while the trunk asks for "
                    'backprop "reversible": the couplings would never be invertible (the '
                    'pretrained ViT with a second stream), so it would run "checkpoint" '
                    "throughout. End beta above 0, e.g. at 1 (RevViT's coupling), or ask for "
                    '"checkpoint" or "autograd" to fine-tune the plain ViT.'
                )

    def before_step(self):
        if not self._couplings:
            return
        alpha, beta = self.values(self.trainer.iter)
        for coupling in self._couplings:
            coupling.set(alpha, beta)
        self.trainer.storage.put_scalars(
            **{"coupling/alpha": alpha, "coupling/beta": beta}, smoothing_hint=False
        )
