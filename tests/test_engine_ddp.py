"""The reversible Function inside DistributedDataParallel (gloo, 2 processes, CPU)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine import make_stack
from torch.nn.parallel import DistributedDataParallel

WORLD = 2


def loss_of(model, x):
    y1, y2 = model(x, x)
    return (y1 * y2).mean()


def worker(rank, init_file, x, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    stack = make_stack(6, dropout=0.0, drop_path=0.0).train()
    model = DistributedDataParallel(stack, find_unused_parameters=False)
    half = x.shape[0] // WORLD
    loss_of(model, x[rank * half : (rank + 1) * half]).backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in stack.named_parameters()}, result_file)
    dist.destroy_process_group()


def test_ddp_gradients_equal_single_process_on_combined_batch():
    x = torch.randn(4, 12, 16, dtype=torch.float64)
    single = make_stack(6, dropout=0.0, drop_path=0.0).train()
    loss_of(single, x).backward()
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "grads.pt")
        mp.spawn(worker, args=(os.path.join(tmp, "init"), x, result), nprocs=WORLD)
        ddp_grads = torch.load(result)
    for name, p in single.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-9, atol=1e-12)
