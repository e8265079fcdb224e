"""Exact measurement of tensor memory, on CPU as well as on GPU.

A CPU allocator has no peak counter, and process RSS is noisy. :class:`MemoryTracker` counts
instead the bytes of the tensor storages that are alive: every storage that an operator creates
inside the context is added when it appears and subtracted (through a weakref finalizer) when
it is freed. The result is exact and deterministic, so memory *properties* can be asserted.

What it counts: storages created by operators inside the context (activations, saved tensors,
gradients, optimizer state created there), whatever their device. What it does not count:
tensors that existed before the context (parameters, gradients and buffers already allocated),
views, and in-place updates of existing tensors (an operator output that shares storage with one
of its inputs is not new memory). Allocator caching and fragmentation are not modelled; on CUDA,
:attr:`MemoryTracker.cuda_peak` reports ``torch.cuda.max_memory_allocated`` over the context too.
"""

import weakref
from typing import Dict, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["MemoryTracker", "MiB", "training_step_peak"]

MiB = float(1 << 20)


class MemoryTracker(TorchDispatchMode):
    """Context manager tracking live and peak tensor bytes created inside it.

    Example::

        with MemoryTracker() as mem:
            loss = model(x).sum()
            stored = mem.current  # bytes kept alive for backward (and the loss)
            loss.backward()
        print(mem.peak / MiB)

    Args:
        grads_of: parameters whose gradients, once accumulated into ``.grad`` inside the
            context, are counted as gradients rather than activations (see ``grads`` and
            ``activation_peak``).

    Attributes:
        current (int): bytes of tracked storages alive now.
        peak (int): the largest ``current`` seen since entering (or :meth:`reset_peak`).
        grads (int): bytes of ``.grad`` of ``grads_of`` created in the context and alive now.
        activation_peak (int): the largest ``current - grads``: everything but parameter
            gradients (saved activations, temporaries, gradients not yet accumulated).
        cuda_peak (int or None): on exit, ``torch.cuda.max_memory_allocated()`` over the context
            minus what was allocated on entry; None when CUDA is not in use.
    """

    def __init__(self, grads_of: Iterable[torch.nn.Parameter] = ()):
        super().__init__()
        self.current = 0
        self.peak = 0
        self.grads = 0
        self.activation_peak = 0
        self.cuda_peak: Optional[int] = None
        self._live: Dict[int, int] = {}  # storage key -> bytes
        self._grad_keys = set()
        self._params = [p for p in grads_of if p.requires_grad]
        self._hooks = []
        self._cuda_base = 0

    def reset_peak(self):
        self.peak = self.current
        self.activation_peak = self.current - self.grads

    def _free(self, key: int):
        nbytes = self._live.pop(key, 0)
        self.current -= nbytes
        if key in self._grad_keys:
            self._grad_keys.discard(key)
            self.grads -= nbytes

    def _track(self, storage: torch.UntypedStorage):
        key = storage._cdata
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.activation_peak = max(self.activation_peak, self.current - self.grads)
        weakref.finalize(storage, self._free, key)

    def _on_grad(self, param: torch.nn.Parameter):
        if param.grad is None:  # already used and freed (an optimizer step inside backward)
            return
        key = param.grad.untyped_storage()._cdata
        if key in self._live and key not in self._grad_keys:
            self._grad_keys.add(key)
            self.grads += self._live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in inputs:
                    self._track(storage)
        return out

    def __enter__(self):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._params]
        return super().__enter__()

    def __exit__(self, *exc):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated() - self._cuda_base
        for hook in self._hooks:
            hook.remove()
        # The finalizers of still-alive storages (e.g. the .grad of these parameters) reference
        # this tracker; holding the parameters here would keep their model alive forever.
        self._hooks, self._params = [], []
        return super().__exit__(*exc)


def training_step_peak(model: torch.nn.Module, batched_inputs) -> int:
    """Peak tensor bytes of one training step (forward, losses, backward) of a Detectron2 model.

    Parameters and gradients that exist before the call are not counted; the gradients the
    step creates are. The model's gradients are reset to None first.
    """
    from detectron2.utils.events import EventStorage

    model.train()
    model.zero_grad(set_to_none=True)
    with EventStorage(), MemoryTracker() as mem:
        losses = model(batched_inputs)
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    return mem.peak
