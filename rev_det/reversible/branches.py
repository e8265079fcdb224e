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
forward    ``shared = prefix(inputs)`` once, each branch on it; nothing recorded
backward   1. ``shared`` again, without autograd; kept while the branches run backward
           2. branch by branch: re-run on ``shared`` under autograd and back-propagated at
              once, so that one branch's activations are alive at a time; the gradients of
              ``shared`` add up
           3. the prefix re-run under autograd, back-propagated once with that sum
========== ===============================================================================

Parameter gradients are accumulated into ``.grad`` inside backward, as the reversible engine
does (the parameters are not inputs of the Function; see :class:`.engine._ReversibleFunction`),
and the generator and autocast states of the forward are replayed. A branch may itself
recompute parts of its work (a reversible sequence, a checkpointed unit): step 2 runs it as
an ordinary training forward.
"""

from typing import Callable, Sequence, Tuple

import torch
from torch import nn

from .engine import _autocast_states, _replay_autocast, _RngState

__all__ = ["recomputed_branches"]


class _BranchesFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, prefix, branches, *inputs):
        ctx.prefix, ctx.branches = prefix, branches
        ctx.autocast = _autocast_states()
        ctx.set_materialize_grads(False)  # a branch whose output gets no gradient is skipped
        ctx.save_for_backward(*inputs)
        ctx.rng = [_RngState(*inputs)]
        shared = prefix(*inputs)
        outputs = []
        for branch in branches:
            ctx.rng.append(_RngState(*inputs))
            outputs.append(branch(shared))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [
            x.detach().requires_grad_(needs)
            for x, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[3:])
        ]
        with torch.enable_grad(), _replay_autocast(ctx.autocast):
            with torch.no_grad(), ctx.rng[0].replay():
                shared = ctx.prefix(*inputs)
            shared.requires_grad_(True)
            for branch, grad, rng in zip(ctx.branches, grads, ctx.rng[1:]):
                if grad is not None:
                    with rng.replay():
                        output = branch(shared)
                    torch.autograd.backward(output, grad)
                    del output  # free this branch's activations before the next
            grad_shared, shared = shared.grad, None
            if grad_shared is not None:
                with ctx.rng[0].replay():
                    shared = ctx.prefix(*inputs)
                torch.autograd.backward(shared, grad_shared)
        return (None, None, None, *(x.grad if x.requires_grad else None for x in inputs))


def recomputed_branches(
    prefix: Callable[..., torch.Tensor],
    branches: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    module: nn.Module,
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
    """
    trainable = any(p.requires_grad for p in module.parameters())
    anchor = inputs[0].new_empty(0).requires_grad_(trainable)
    return _BranchesFunction.apply(anchor, prefix, tuple(branches), *inputs)
