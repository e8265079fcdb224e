#!/usr/bin/env python
"""Train a config a few iterations per backprop mode from one seed, weights and batches, and
print the losses side by side with their relative differences to the first mode.

Every mode starts from the same initial weights, sees the same batches and replays the same
random state for ROI sampling, so only the backprop (and rounding) differs. ``--perturb``
multiplies the weights of every mode after the first by ``1 + eps * N(0, 1)``: the rounding-level
control that shows how far two runs part from rounding alone. ``--dtype float64`` trains in
double precision, where rounding is ~1e-16.

Example (the measurement quoted in docs/demo.md, "Demo equivalence")::

    python tools/demo_equivalence.py --iterations 20 --dtype float64
    python tools/demo_equivalence.py --iterations 20 --modes autograd reversible checkpoint
    python tools/demo_equivalence.py --iterations 20 --modes autograd autograd --perturb 1e-7
"""

import argparse
import contextlib
import copy
import os
from typing import Dict, List, Sequence
from unittest import mock

import torch
import torchvision.ops.boxes as box_ops
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventStorage
from torch.nn.attention import SDPBackend, sdpa_kernel

import rev_det
from rev_det.data import prepare_datasets
from rev_det.modeling import set_backprop
from rev_det.solver import build_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "configs", "demo", "mask_rcnn_rev_vit_demo.yaml")


def _prepare(config_file: str, iterations: int, dtype: torch.dtype, opts: Sequence[str]):
    """The config, a freshly initialised model in ``dtype`` and ``iterations`` training batches."""
    cfg = get_cfg()
    rev_det.add_revdet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["DATALOADER.NUM_WORKERS", 0, *opts])
    prepare_datasets(cfg.DATASETS.TRAIN)
    seed_all_rng(cfg.SEED)  # the training sampler draws its seed from numpy
    loader = iter(build_detection_train_loader(cfg))
    batches = [next(loader) for _ in range(iterations)]
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)
    return cfg, model, batches


@contextlib.contextmanager
def nms_in_score_dtype():
    """Detectron2 v0.6 decodes boxes in fp32 whatever the model's dtype, and torchvision's NMS
    wants boxes and scores of one dtype: give it boxes in the scores' dtype (exact upcast)."""
    nms = box_ops.batched_nms
    with mock.patch.object(box_ops, "batched_nms", lambda b, s, i, t: nms(b.to(s.dtype), s, i, t)):
        with EventStorage():
            yield


def demo_losses(
    config_file: str,
    modes: Sequence[str],
    iterations: int,
    dtype: torch.dtype = torch.float32,
    perturb: float = 0.0,
    opts: Sequence[str] = (),
) -> List[List[float]]:
    """The training losses of ``iterations`` steps per mode (a list per entry of ``modes``)."""
    cfg, model, batches = _prepare(config_file, iterations, dtype, opts)
    initial = copy.deepcopy(model.state_dict())
    history = []
    with nms_in_score_dtype():
        for k, mode in enumerate(modes):
            model.load_state_dict(initial)
            if k and perturb:
                noise = torch.Generator().manual_seed(k)
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1 + perturb * torch.randn(p.shape, generator=noise, dtype=p.dtype))
            set_backprop(model, mode)
            optimizer = build_optimizer(cfg, model)
            torch.manual_seed(1)  # the RPN and ROI heads sample anchors and proposals at random
            losses = []
            for batch in batches:
                loss = sum(model(batch).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            history.append(losses)
    return history


def demo_gradients(
    config_file: str,
    modes: Sequence[str],
    dtype: torch.dtype = torch.float32,
    opts: Sequence[str] = (),
) -> List[Dict[str, torch.Tensor]]:
    """The gradients of one training step per mode, from the same weights, batch and RNG state.

    The forward pass is the same computation in every mode, so Mask R-CNN's discrete choices
    (top-k proposals, NMS, ROI sampling) are the same too, and the gradients differ only by the
    rounding of the recomputed activations: a comparison that cannot flip by luck, unlike losses
    several optimizer steps later.
    """
    _, model, (batch,) = _prepare(config_file, 1, dtype, opts)
    grads = []
    # One attention kernel whether grad is on or not: the reversible trunk runs its forward
    # without grad, where PyTorch may otherwise pick another kernel, whose rounding differs.
    # With the forward bit for bit the same, no discrete choice (top-k, matching ties) can flip.
    with nms_in_score_dtype(), sdpa_kernel([SDPBackend.MATH]):
        for mode in modes:
            set_backprop(model, mode)
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            sum(model(batch).values()).backward()
            grads.append(
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            )
    return grads


def relative_differences(reference: List[float], other: List[float]) -> List[float]:
    return [abs(a - b) / abs(a) for a, b in zip(reference, other)]


def format_table(modes: Sequence[str], history: List[List[float]]) -> str:
    header = ["iteration"] + [f"{m} ({k})" for k, m in enumerate(modes)]
    header += [f"rel. diff {k} vs 0" for k in range(1, len(modes))]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    diffs = [relative_differences(history[0], h) for h in history[1:]]
    for i in range(len(history[0])):
        cells = [str(i + 1)] + [f"{h[i]:.6f}" for h in history] + [f"{d[i]:.1e}" for d in diffs]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--modes", nargs="+", default=["autograd", "reversible"])
    parser.add_argument("--perturb", type=float, default=0.0, help="relative weight noise")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    history = demo_losses(
        args.config_file,
        args.modes,
        args.iterations,
        getattr(torch, args.dtype),
        args.perturb,
        args.opts,
    )
    print(format_table(args.modes, history))
    return {"modes": args.modes, "losses": history}


if __name__ == "__main__":
    main()
