"""MODEL.REV.RECOMPUTE_HEADS: the RPN, box and mask heads recompute their activations in
backward, with autograd's gradients and the same parameter names, and keep less."""

import os
import sys

import pytest
import torch
from detectron2.utils.events import EventStorage
from helpers import ROOT, fake_batch, rel_err, tiny_cfg

from rev_det.modeling import build_detector, recompute_heads
from rev_det.utils.memory import MemoryTracker

sys.path.insert(0, os.path.join(ROOT, "tools"))

from demo_equivalence import nms_in_score_dtype  # noqa: E402

# The box head with convolutions (as ViTDet's, whose four hold most of what the heads keep).
HEADS = ("MODEL.ROI_BOX_HEAD.NUM_CONV", 2, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32)


def step(recompute):
    cfg = tiny_cfg(
        *HEADS, "MODEL.REV.RECOMPUTE_HEADS", recompute, "MODEL.REVVIT.DROP_PATH_RATE", 0.0
    )
    torch.manual_seed(0)
    model = build_detector(cfg).double().train()
    batch = [dict(d, image=d["image"].double()) for d in fake_batch()]
    torch.manual_seed(1)
    with EventStorage(), nms_in_score_dtype(), MemoryTracker() as mem:
        loss = sum(model(batch).values())
        stored = mem.current
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, grads, stored


def test_recomputed_heads_give_autograds_gradients_keep_their_names_and_store_less():
    plain, grads, stored = step(False)
    model, grads_recomputed, stored_recomputed = step(True)
    assert type(model.roi_heads.box_head).__name__ == "RecomputedFastRCNNConvFCHead"
    assert type(model.proposal_generator.rpn_head).__name__ == "RecomputedStandardRPNHead"
    assert type(model.roi_heads.mask_head).__name__ == "RecomputedMaskRCNNConvUpsampleHead"
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert grads.keys() == grads_recomputed.keys()
    assert "roi_heads.box_head.conv1.weight" in grads
    for name, grad in grads.items():
        assert rel_err(grads_recomputed[name], grad) < 1e-10, name
    assert stored_recomputed < 0.8 * stored
    # Inference runs the heads once, as before.
    model.eval()
    with torch.no_grad(), nms_in_score_dtype():
        out = model([{"image": fake_batch()[0]["image"].double()}])
    assert len(out) == 1


def test_recompute_heads_refuses_batch_norm_and_models_without_heads():
    cfg = tiny_cfg(*HEADS, "MODEL.ROI_BOX_HEAD.NORM", "BN")
    with pytest.raises(ValueError, match=r"roi_heads.box_head.conv1.norm is a batch norm.*'GN'"):
        recompute_heads(build_detector(cfg))
    with pytest.raises(ValueError, match="no Detectron2 RPN, box or mask head"):
        recompute_heads(torch.nn.Linear(2, 2))
