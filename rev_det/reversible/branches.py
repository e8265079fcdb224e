"""Several outputs that share their first part, as one recomputed unit.

::

    inputs --prefix--> shared --branch 0--> output 0
                             |--branch 1--> output 1
                             '-- ...

Checkpointing each output on its own (``torch.utils.checkpoint`` of ``branch_i(prefix(x))``)
re-runs the prefix in every branch, in forward and again in backward; checkpointing the prefix
and the branches separately keeps ``shared`` between forward and backward. Here nothing is kept
but references to the inputs, and the prefix runs three times per training step whatever the
number of branches:

========== ===============================================================================
forward    ``shared = prefix(inputs)`` once, each branch on it; no activation saved
backward   1. when the first branch is re-run: ``shared`` again, without autograd, kept
              until the prefix's own backward
           2. each branch, as autograd reaches it: re-run on ``shared`` and back-propagated,
              so that one branch's activations are alive at a time; autograd adds up the
              branches' gradients of ``shared``
           3. after the last branch: ``shared`` is dropped, the prefix re-run under autograd
              and back-propagated once with that sum
========== ===============================================================================

The prefix is a custom autograd Function that keeps nothing; each branch is a
``torch.utils.checkpoint`` unit that reads ``shared`` from the state the call's units share
(:class:`_Recomputation`) instead of taking it as an input, which checkpoint would keep: the
forward's ``shared`` while the branches are built, the recomputed one in backward. Autograd
thus frees each branch's output gradient and re-run activations as soon as it is done with
them, and may interleave the branches with other work, as it would for ordinary modules.
The prefix's parameter gradients are accumulated into ``.grad`` inside its backward, as the
reversible engine does (the parameters are not inputs of the Function; see
:class:`.engine._ReversibleFunction`), and the prefix's generator and autocast states are
replayed (checkpoint replays the branches'). A branch may itself recompute parts of its work
(a reversible sequence, a checkpointed unit).
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .engine import _autocast_states, _replay_autocast, _RngState

__all__ = ["recomputed_branches"]


class _Recomputation:
    """What the prefix and the branches of one call share: the prefix, its inputs and the states
    to replay it in, and ``shared`` (the forward's while the branches are built, then none until
    a branch is re-run in backward, then the recomputed one until the prefix's backward)."""

    def __init__(self, prefix: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]):
        self.prefix, self.inputs = prefix, tuple(inputs)
        self.autocast = _autocast_states()
        self.rng = _RngState(*inputs)
        self.shared: Optional[torch.Tensor] = None

    def run_prefix(self, inputs) -> torch.Tensor:
        with _replay_autocast(self.autocast), self.rng.replay():
            return self.prefix(*inputs)

    def shared_for_branch(self) -> torch.Tensor:
        if self.shared is None:  # the first branch re-run in backward
            with torch.no_grad():
                shared = self.run_prefix(self.inputs)
            # Requiring grad, as the forward's did, the branch saves the same tensors in its
            # re-run (checkpoint checks that); the gradient flows through the forward's graph.
            self.shared = shared.requires_grad_(True)
        return self.shared

    def run_branch(self, branch: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return branch(self.shared_for_branch())


class _PrefixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, anchor, *inputs):
        ctx.state = state
        ctx.save_for_backward(*inputs)
        return state.prefix(*inputs)

    @staticmethod
    def backward(ctx, grad_shared):
        state = ctx.state
        state.shared = None  # every branch is done
        inputs = [
            x.detach().requires_grad_(needs)
            for x, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[2:])
        ]
        with torch.enable_grad():
            shared = state.run_prefix(inputs)
        torch.autograd.backward(shared, grad_shared)
        return (None, None, *(x.grad if x.requires_grad else None for x in inputs))


def recomputed_branches(
    prefix: Callable[..., torch.Tensor],
    branches: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    module: nn.Module,
    finish: Optional[Sequence[Callable[[torch.Tensor], torch.Tensor]]] = None,
) -> Tuple[torch.Tensor, ...]:
    """``tuple(branch(prefix(*inputs)) for branch in branches)``, as one recomputed unit.

    Only references to ``inputs`` are kept for backward (see the module docstring). Use it where
    a mode other than autograd should store less (:meth:`.BackpropModule.recomputes`); the
    gradients are autograd's up to the order in which the branches' gradients of ``shared``
    are summed.

    Args:
        prefix: maps ``inputs`` to the tensor every branch reads.
        branches: each maps that tensor to one output.
        inputs: the prefix's tensor arguments.
        module: the module owning every parameter that prefix and branches use; backward runs
            whenever one of them is trainable, even if no input requires grad (a frozen trunk
            under a trained pyramid).
        finish: per branch, a part applied to its output right after it, outside the
            recomputed unit (one that keeps what its own backward needs, such as a reversible
            sequence). Autograd takes the most recently recorded of the parts ready first, so
            in backward each finish is followed by its branch, and one branch's gradient is
            alive at a time.
    """
    trainable = any(p.requires_grad for p in module.parameters())
    anchor = inputs[0].new_empty(0).requires_grad_(trainable)
    state = _Recomputation(prefix, inputs)
    state.shared = _PrefixFunction.apply(state, anchor, *inputs)
    finish = [_unchanged] * len(branches) if finish is None else finish
    outputs = tuple(
        then(checkpoint(state.run_branch, branch, use_reentrant=False))
        for branch, then in zip(branches, finish, strict=True)
    )
    state.shared = None  # not kept till backward
    return outputs


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x
