"""The classification section, the paper's setting: per-image training memory of ViT-sized
reversible trunks with global average pooling and a linear head at 224x224."""

import os
from functools import partial
from typing import Dict, List, Tuple

import torch
from torch import nn

from rev_det.modeling import RevViT

from ..detectors import MODES, Detection
from ..measure import Row, budgeted, measure, param_mib
from ..report import markdown_section, plot, series
from .section import Section

__all__ = ["CLASSIFICATION", "CLASSIFIERS", "Classifier", "marginal_per_image"]

# Classification trunks at 224: (width, depth, heads). The paper's per-image memory in MB,
# plain -> reversible (its Table of ImageNet memory; ViT-Ti is not in the paper).
CLASSIFIERS = {
    "vit_ti": (192, 12, 3),
    "vit_s": (384, 12, 6),
    "vit_b": (768, 12, 12),
    "vit_l": (1024, 24, 16),
}
PAPER_MB_PER_IMAGE = {"vit_s": (66.5, 8.8), "vit_b": (129.7, 17.0), "vit_l": (349.3, 22.6)}


class Classifier(nn.Module):
    """A RevViT trunk at 224 with global average pooling and a linear head (the paper's setting).

    Args:
        embed_dim: width of each stream.
        depth: number of reversible blocks (all global attention).
        heads: attention heads.
        backprop: "autograd", "checkpoint" or "reversible".
        num_classes: outputs of the linear head.
    """

    def __init__(self, embed_dim: int, depth: int, heads: int, backprop: str, num_classes=1000):
        super().__init__()
        self.net = RevViT(
            img_size=224,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=heads,
            drop_path_rate=0.1,
            pretrain_img_size=224,
            backprop=backprop,
        )
        self.head = nn.Linear(2 * embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)["last_feat"].mean(dim=(2, 3)))


def _forward(model, images, labels, amp: bool):
    def forward():
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            return nn.functional.cross_entropy(model(images), labels)

    return forward


def _run(args, results, det: Detection):
    rows = []
    for name in args.classifiers:
        for mode in MODES:
            torch.manual_seed(0)
            model = Classifier(*CLASSIFIERS[name], backprop=mode).to(args.device).train()
            for batch in sorted(args.cls_batches):
                images = torch.randn(batch, 3, 224, 224, device=args.device)
                labels = torch.randint(0, 1000, (batch,), device=args.device)
                row = dict(model=name, backprop=mode, batch=batch, params=param_mib(model))
                forward = _forward(model, images, labels, args.amp)
                run = partial(measure, forward, model.parameters(), args.device)
                points = [(("classification", name, mode), batch)]
                what = f"classification {name} {mode} batch {batch}"
                row.update(budgeted(det.budget, points, row["params"], what, run))
                if row["measured"]:
                    row["per_image"] = row["activations"] / batch
                    row["stored_per_image"] = row["stored"] / batch
                    print(
                        f"  {name} {mode:10s} batch {batch:3d}: {row['per_image']:7.2f} MiB/image"
                    )
                rows.append(row)
    results["classification"] = rows


def marginal_per_image(rows: List[Row]) -> Dict[Tuple[str, str], Tuple[float, float, int, int]]:
    """Per (model, backprop): the activation MiB added per image between the two largest
    measured batches, the intercept of that line (memory that does not grow with the batch)
    and the two batches."""
    out = {}
    for group in series(rows, ("model", "backprop")):
        pts = [(r["batch"], r["activations"]) for r in group if r["measured"]]
        if len(pts) >= 2:
            (b0, m0), (b1, m1) = pts[-2:]
            slope = (m1 - m0) / (b1 - b0)
            out[(group[0]["model"], group[0]["backprop"])] = (slope, m1 - slope * b1, b0, b1)
    return out


def _report(args, results) -> List[str]:
    rows = results["classification"]
    marginal = marginal_per_image(rows)
    notes = []
    for name in args.classifiers:
        at = {(r["backprop"], r["batch"]): r for r in rows if r["model"] == name and r["measured"]}
        for batch in sorted(args.cls_batches):
            if ("autograd", batch) in at and ("reversible", batch) in at:
                a, r = at[("autograd", batch)]["per_image"], at[("reversible", batch)]["per_image"]
                notes.append(
                    f"{name}, batch {batch}: {a:.1f} -> {r:.1f} MiB per image, "
                    f"reversible {a / r:.2f}x lower than autograd"
                )
        if (name, "autograd") in marginal and (name, "reversible") in marginal:
            a, r = marginal[(name, "autograd")], marginal[(name, "reversible")]
            notes.append(
                f"{name}, marginal (per added image; batches {a[2]}->{a[3]} for autograd, "
                f"{r[2]}->{r[3]} for reversible): {a[0]:.1f} -> {r[0]:.1f} MiB, {a[0] / r[0]:.2f}x;"
                f" batch-independent part {a[1]:.1f} and {r[1]:.1f} MiB"
            )
        if name in PAPER_MB_PER_IMAGE:
            plain, rev = PAPER_MB_PER_IMAGE[name]
            notes.append(f"{name}, paper: {plain} -> {rev} MB per image, {plain / rev:.1f}x")
    path = os.path.join(args.out, "memory_per_image_vs_batch.png")
    labels = ("batch", "activations per image (MiB)")
    notes.append(plot(rows, "batch", "per_image", ("model", "backprop"), labels, path, log="xy"))
    columns = ["model", "backprop", "batch", "params", "peak", "activations", "stored"]
    columns += ["per_image", "stored_per_image"]
    return markdown_section("Classification at 224 (the paper's setting)", rows, columns, notes)


CLASSIFICATION = Section(
    name="classification",
    what="The paper's setting: per-image training memory of ViT-sized reversible trunks with "
    "global average pooling and a linear head at 224x224 (``--classifiers``), at each of "
    "``--cls-batches``, the marginal memory per added image between the two largest batches, "
    "and the paper's per-image figures beside them.",
    run=_run,
    report=_report,
    detector=False,
)
