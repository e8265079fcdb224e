"""The classification section, the paper's setting: per-image training memory of reversible
trunks (ViT sizes and the paper's Rev-MViT-B) with global average pooling and a linear head at
224x224, beside the non-reversible model of the same layout (:mod:`..plain`), as the paper
compares them."""

import os
from functools import partial
from typing import Dict, List, Tuple

import torch
from torch import nn

from rev_det.modeling import REVMVIT_PAPER_OPTIONS, REVMVIT_SIZES, RevMViT, RevViT

from ..detectors import MODES, Detection
from ..measure import Row, budgeted, measure, param_mib
from ..plain import PlainMViT, PlainViT
from ..report import markdown_section, plot, series
from .section import Section

__all__ = [
    "CLASSIFICATION",
    "CLASSIFIERS",
    "CLASSIFIER_MODES",
    "Classifier",
    "build_classifier",
    "marginal_per_image",
]

# Classification trunks at 224: ViTs by (width, depth, heads), all global attention, and the
# paper's Rev-MViT-B (a REVMVIT_SIZES row, in the official configuration).
VIT_CLASSIFIERS = {
    "vit_ti": (192, 12, 3),
    "vit_s": (384, 12, 6),
    "vit_b": (768, 12, 12),
    "vit_l": (1024, 24, 16),
}
MVIT_CLASSIFIERS = {"mvit_b": "paper_b"}
CLASSIFIERS = (*VIT_CLASSIFIERS, *MVIT_CLASSIFIERS)
# "plain": the non-reversible model of the same layout (the paper's baseline); then the
# reversible model in each backprop mode.
CLASSIFIER_MODES = ("plain", *MODES)
# The paper's per-image memory in MB, plain -> reversible (its table of ImageNet memory; ViT-Ti
# is not in it).
PAPER_MB_PER_IMAGE = {
    "vit_s": (66.5, 8.8),
    "vit_b": (129.7, 17.0),
    "vit_l": (349.3, 22.6),
    "mvit_b": (153.6, 66.8),
}


class Classifier(nn.Module):
    """A trunk at 224 with global average pooling and a linear head (the paper's setting).

    Args:
        net: the trunk; ``net(images)[key]`` is its (B, channels, h, w) output.
        key: the output to pool.
        channels: its channels.
        num_classes: outputs of the linear head.
    """

    def __init__(self, net: nn.Module, key: str, channels: int, num_classes: int = 1000):
        super().__init__()
        self.net, self.key = net, key
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)[self.key].mean(dim=(2, 3)))


def build_classifier(name: str, mode: str) -> Classifier:
    """The classifier ``name`` (one of :data:`CLASSIFIERS`) in ``mode`` (one of
    :data:`CLASSIFIER_MODES`: "plain" is the non-reversible model of the same layout)."""
    if name in VIT_CLASSIFIERS:
        width, depth, heads = VIT_CLASSIFIERS[name]
        kwargs = dict(img_size=224, embed_dim=width, depth=depth, num_heads=heads)
        kwargs.update(drop_path_rate=0.1, pretrain_img_size=224)
        if mode == "plain":
            return Classifier(PlainViT(**kwargs), "last_feat", width)
        return Classifier(RevViT(**kwargs, backprop=mode), "last_feat", 2 * width)
    size = MVIT_CLASSIFIERS[name]
    if mode == "plain":
        return Classifier(PlainMViT(size), "scale5", 8 * REVMVIT_SIZES[size]["embed_dim"])
    net = RevMViT(
        **REVMVIT_SIZES[size],
        # The official configuration; the classifier's output only.
        **REVMVIT_PAPER_OPTIONS,
        pretrain_use_cls_token=False,
        backprop=mode,
        out_features=("scale5",),
    )
    return Classifier(net, "scale5", 16 * REVMVIT_SIZES[size]["embed_dim"])


def _forward(model, images, labels, amp: bool):
    def forward():
        with torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
            return nn.functional.cross_entropy(model(images), labels)

    return forward


def _run(options, results, det: Detection):
    rows = []
    for name in options.classifiers:
        for mode in CLASSIFIER_MODES:
            torch.manual_seed(0)
            model = build_classifier(name, mode).to(options.device).train()
            for batch in sorted(options.cls_batches):
                images = torch.randn(batch, 3, 224, 224, device=options.device)
                labels = torch.randint(0, 1000, (batch,), device=options.device)
                row = dict(model=name, backprop=mode, batch=batch, params=param_mib(model))
                forward = _forward(model, images, labels, options.amp)
                run = partial(measure, forward, model.parameters(), options.device)
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


def _report(options, results) -> List[str]:
    rows = results["classification"]
    marginal = marginal_per_image(rows)
    notes = []
    for name in options.classifiers:
        at = {(r["backprop"], r["batch"]): r for r in rows if r["model"] == name and r["measured"]}
        for batch in sorted(options.cls_batches):
            if ("plain", batch) in at and ("reversible", batch) in at:
                a, r = at[("plain", batch)]["per_image"], at[("reversible", batch)]["per_image"]
                notes.append(
                    f"{name}, batch {batch}: plain {a:.1f} -> reversible {r:.1f} MiB per image, "
                    f"{a / r:.2f}x lower"
                )
        if (name, "plain") in marginal and (name, "reversible") in marginal:
            a, r = marginal[(name, "plain")], marginal[(name, "reversible")]
            notes.append(
                f"{name}, marginal (per added image; batches {a[2]}->{a[3]} for plain, "
                f"{r[2]}->{r[3]} for reversible): {a[0]:.1f} -> {r[0]:.1f} MiB, {a[0] / r[0]:.2f}x;"
                f" batch-independent part {a[1]:.1f} and {r[1]:.1f} MiB"
            )
        if name in PAPER_MB_PER_IMAGE:
            plain, rev = PAPER_MB_PER_IMAGE[name]
            notes.append(f"{name}, paper: {plain} -> {rev} MB per image, {plain / rev:.1f}x")
    path = os.path.join(options.out, "memory_per_image_vs_batch.png")
    labels = ("batch", "activations per image (MiB)")
    notes.append(plot(rows, "batch", "per_image", ("model", "backprop"), labels, path, log="xy"))
    columns = ["model", "backprop", "batch", "params", "peak", "activations", "stored"]
    columns += ["per_image", "stored_per_image"]
    return markdown_section("Classification at 224 (the paper's setting)", rows, columns, notes)


CLASSIFICATION = Section(
    name="classification",
    what="The paper's setting: per-image training memory of reversible trunks (ViT sizes, the "
    "paper's Rev-MViT-B) with global average pooling and a linear head at 224x224 "
    "(``--classifiers``), in every backprop mode and as the non-reversible model of the same "
    "layout (``plain``, the paper's baseline), at each of ``--cls-batches``, the marginal memory "
    "per added image between the two largest batches, and the paper's per-image figures.",
    run=_run,
    report=_report,
    detector=False,
)
