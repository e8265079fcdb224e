"""The optimizer step inside backward: each parameter is updated as soon as its gradient is
complete, and that gradient is freed at once.

A training step normally holds every parameter's gradient between backward and ``step()``: as
many bytes as the parameters, on top of them and AdamW's moments. Here the step of a parameter runs
in backward, from a post-accumulate-grad hook (PyTorch's ``register_post_accumulate_grad_hook``),
so at most the gradients of the parameters still being back-propagated are alive::

    backward:  ... block 31: grads of its params -> AdamW step of each, grad = None
                   block 30: grads of its params -> AdamW step of each, grad = None
                   ...                                  (reversible: block by block)
    step():    nothing left to do (a parameter given a gradient by other means is stepped)

The optimizer stays the one :func:`rev_det.solver.build_optimizer` builds (an AdamW or SGD with
its parameter groups), stepped one parameter at a time with its group's current ``lr`` and
``weight_decay``; its ``state_dict`` (and so checkpoints and resume), the lr scheduler and the
``zero_grad()``, ``backward()``, ``step()`` loop of Detectron2's trainers work unchanged.

Under DistributedDataParallel a parameter's own gradient is not the one to step with: DDP
all-reduces gradients in buckets. There :meth:`StepInBackward.attach_ddp` registers a DDP
communication hook instead: it all-reduces a bucket (Detectron2's default, the average) and then
steps that bucket's parameters with the reduced gradients. DDP still copies the reduced buckets
into ``.grad`` at the end of backward; ``step()`` drops those gradients instead of stepping again.

What cannot combine with it is refused: an optimizer other than AdamW or SGD (their updates are
per parameter; others, such as LAMB or Shampoo, need every gradient at once), a float16
GradScaler (it decides to skip a step only after every gradient is known), gradient accumulation
or a parameter given two gradients in one step (found at the second gradient), and clipping by
the norm of all gradients together (Detectron2's ``SOLVER.CLIP_GRADIENTS`` clips each parameter
on its own and works).
"""

import logging
import threading
import types
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["StepInBackward", "step_in_backward", "attach_ddp", "check_step_in_backward"]

logger = logging.getLogger(__name__)

# Optimizers whose update of a parameter reads only that parameter, its gradient and its state.
_PER_PARAMETER = (torch.optim.AdamW, torch.optim.SGD)


def check_step_in_backward(optimizer: torch.optim.Optimizer, fp16_scaler: bool, key: str) -> None:
    """Raise at start-up if the configuration cannot step inside backward.

    Args:
        optimizer: the optimizer built for training.
        fp16_scaler: whether training scales float16 losses with a GradScaler.
        key: the switch's config key, named in the messages.
    """
    if not isinstance(optimizer, _PER_PARAMETER):
        raise ValueError(
            f"{key} needs an optimizer that updates each parameter from its own gradient (AdamW "
            f"or SGD); {type(optimizer).__name__} is not one. Use AdamW or SGD, or set {key} to "
            "False."
        )
    if fp16_scaler:
        raise ValueError(
            f"{key} cannot combine with float16 AMP: its GradScaler skips a step when any "
            "gradient overflows, which is known only after all of them, while this updates each "
            "parameter as soon as its own is complete. Train in bfloat16 (SOLVER.AMP.PRECISION "
            f'"bfloat16", LazyConfig train.amp.precision="bfloat16") or fp32, or set {key} to '
            "False."
        )


class StepInBackward:
    """Runs ``optimizer``'s update of each parameter inside backward (see the module docstring).

    Created by :func:`step_in_backward`; it lives as long as the parameters (their hooks hold it).

    Args:
        optimizer: an AdamW or SGD (or a subclass, e.g. with Detectron2's per-parameter
            gradient clipping) over trainable parameters.
        names: parameter -> name, for error messages.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: Dict[nn.Parameter, str]):
        check_step_in_backward(optimizer, False, "The step in backward")
        self.optimizer = optimizer
        self.names = names
        # Group indexes, not the group dicts: load_state_dict replaces the dicts.
        self._group_index = {
            p: i for i, group in enumerate(optimizer.param_groups) for p in group["params"]
        }
        self._stepped = set()  # parameters stepped since the last optimizer.step()
        self._ddp = False
        self._lock = threading.Lock()  # DDP's hooks may complete on the backend's threads
        for p in self._group_index:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self._on_gradient)

    def _name(self, p: nn.Parameter) -> str:
        return self.names.get(p, f"a parameter of shape {tuple(p.shape)}")

    def _on_gradient(self, p: nn.Parameter) -> None:
        if self._ddp:
            return  # stepped after the bucket's all-reduce
        self._step(p, p.grad)
        p.grad = None

    def _step(self, p: nn.Parameter, grad: torch.Tensor) -> None:
        """The optimizer's step of ``p`` alone, with ``grad`` and its group's current settings."""
        with self._lock:
            if p in self._stepped:
                raise RuntimeError(
                    f"{self._name(p)} received a second gradient before optimizer.step(): with "
                    "the optimizer step inside backward each parameter is updated by its first "
                    "complete gradient, so gradient accumulation (several backward passes per "
                    "step) and parameters back-propagated twice in one step cannot work. Turn "
                    "SOLVER.STEP_IN_BACKWARD (LazyConfig: train.step_in_backward) off for them."
                )
            optimizer = self.optimizer
            groups, own = optimizer.param_groups, p.grad
            optimizer.param_groups = [dict(groups[self._group_index[p]], params=[p])]
            p.grad = grad
            try:
                type(optimizer).step(optimizer)  # the class's step: hooks, clipping and all
            finally:
                optimizer.param_groups, p.grad = groups, own
            self._stepped.add(p)

    def step(self, closure=None):
        """What ``optimizer.step()`` does now: the parameters stepped inside backward are done
        (a gradient DDP wrote after their step is dropped); one given a gradient by other means
        is stepped as usual."""
        for p in self._stepped:
            p.grad = None
        self._stepped.clear()
        if closure is None and all(p.grad is None for p in self._group_index):
            return None
        return type(self.optimizer).step(self.optimizer, closure)

    def attach_ddp(self, model: nn.Module, fp16_compression: bool = False) -> None:
        """Step after DDP's all-reduce of each bucket instead of at each local gradient.

        Call it once ``model`` is wrapped in DistributedDataParallel (with no communication
        hook of its own: DDP takes one), before training.

        Args:
            model: the DistributedDataParallel model.
            fp16_compression: all-reduce in float16 (Detectron2's ``train.ddp.fp16_compression``,
                which registers the same compression as a hook of its own).
        """
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import (
            allreduce_hook,
            fp16_compress_hook,
        )

        reduce = fp16_compress_hook if fp16_compression else allreduce_hook

        def reduce_then_step(state, bucket):
            def step(future):
                reduced = future.value()
                for p, grad in zip(bucket.parameters(), bucket.gradients()):
                    if p in self._group_index:
                        self._step(p, grad)
                return reduced

            return reduce(state, bucket).then(step)

        model.register_comm_hook(None, reduce_then_step)
        self._ddp = True


def _optimizer_step(optimizer: torch.optim.Optimizer, closure=None):
    # A function of the optimizer, bound to it: lr schedulers re-bind ``optimizer.step``'s
    # function to the optimizer to count its calls.
    return optimizer.step_in_backward.step(closure)


def step_in_backward(
    optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None
) -> torch.optim.Optimizer:
    """Make ``optimizer`` update each parameter inside backward (see the module docstring).

    Args:
        optimizer: an AdamW or SGD with its parameter groups (what
            :func:`rev_det.solver.build_optimizer` builds).
        model: the model, whose parameter names the error messages use; if it is (or later
            becomes) a DistributedDataParallel, call ``optimizer.step_in_backward.attach_ddp``.

    Returns:
        ``optimizer`` itself, with the :class:`StepInBackward` as ``optimizer.step_in_backward``.
    """
    names = {p: n for n, p in model.named_parameters()} if model is not None else {}
    optimizer.step_in_backward = StepInBackward(optimizer, names)
    optimizer.step = types.MethodType(_optimizer_step, optimizer)
    logger.info("The optimizer steps each parameter inside backward (step in backward).")
    return optimizer


def attach_ddp(
    optimizer: torch.optim.Optimizer, model: nn.Module, fp16_compression: bool = False
) -> None:
    """If ``optimizer`` steps in backward and ``model`` is a DistributedDataParallel, step after
    its all-reduce (:meth:`StepInBackward.attach_ddp`); otherwise nothing."""
    from torch.nn.parallel import DistributedDataParallel

    owner = getattr(optimizer, "step_in_backward", None)
    if owner is not None and isinstance(model, DistributedDataParallel):
        owner.attach_ddp(model, fp16_compression)
