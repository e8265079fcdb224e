"""The exact tensor-memory tracker."""

import torch

from rev_det.utils.memory import MemoryTracker

MB = 1 << 20


def test_counts_new_storages_once_and_subtracts_frees():
    x = torch.zeros(MB // 4)  # 1 MiB, created before: not counted
    with MemoryTracker() as mem:
        y = x + 1  # 1 MiB
        view = y[::2]  # a view: no new storage
        y.add_(1)  # in place: no new storage
        assert mem.current == MB
        z = torch.ones(MB // 2)  # 2 MiB
        assert mem.current == 3 * MB
        del z
        assert mem.current == MB and mem.peak == 3 * MB
        del y, view
        assert mem.current == 0
    assert mem.peak == 3 * MB


def test_backward_and_gradient_split():
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(1024, 256, requires_grad=True)
    with MemoryTracker(grads_of=lin.parameters()) as mem:
        y = torch.relu(lin(x))  # relu keeps its 1 MiB output for backward
        assert mem.current == MB
        y.sum().backward()
        del y
    weight_and_bias = (256 * 256 + 256) * 4
    assert mem.grads == weight_and_bias  # lin.weight.grad and lin.bias.grad
    assert mem.current == MB + weight_and_bias  # x.grad and the parameter gradients
    assert mem.current - mem.grads == MB  # x.grad is not a parameter gradient


def test_tracker_does_not_keep_the_measured_model_alive():
    import gc
    import weakref

    lin = torch.nn.Linear(64, 64)
    with MemoryTracker(grads_of=lin.parameters()):
        lin(torch.randn(8, 64)).sum().backward()
    alive = weakref.ref(lin.weight)  # the parameters (and .grad) are what would leak
    del lin
    gc.collect()
    assert alive() is None
