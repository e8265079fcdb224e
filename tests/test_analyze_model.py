"""tools/analyze_model.py: the SDPA FLOP rule, and the table on tiny configs in every backprop mode."""

import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from rev_det.reversible import BACKPROP_MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import analyze_model  # noqa: E402

DEMOS = [
    os.path.join("configs", "demo", "mask_rcnn_rev_vit_demo.yaml"),
    os.path.join("configs", "demo", "mask_rcnn_rev_mvit_demo.yaml"),
]
# Both demos shrunk (each reads its own trunk's keys); block 1 of the RevViT is global.
TINY = [
    "MODEL.REVVIT.EMBED_DIM", "48", "MODEL.REVVIT.DEPTH", "2",
    "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", "[0]", "MODEL.REVMVIT.EMBED_DIM", "16",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64",
    "MODEL.ROI_MASK_HEAD.CONV_DIM", "32", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "TEST.DETECTIONS_PER_IMAGE", "10", "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
]  # fmt: skip


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_counts_both_matmuls():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 5)
    flops = analyze_model.flop_analysis(_Attention(), (q, k, v))
    # q k^T: 2 * 3 * 10 * 12 * 8 multiply-adds; attention times v: 2 * 3 * 10 * 12 * 5.
    assert flops.total() == 2 * 3 * 10 * 12 * (8 + 5)


def test_counts_positive_and_equal_in_every_backprop_mode(tmp_path):
    runs = {}
    for mode in BACKPROP_MODES:
        out = str(tmp_path / mode)
        # Both trunks in the default mode, RevViT (trunk and pyramid reversible) in every mode.
        configs = DEMOS if mode == "reversible" else DEMOS[:1]
        argv = ["--config-file", *configs, "--trunk-size", "64", "--out", out]
        results = analyze_model.main(argv + ["--opts", *TINY, "MODEL.REV.BACKPROP", mode])
        with open(os.path.join(out, "results.md")) as f:
            table = f.read()
        for run in results["runs"]:
            assert run["backprop"] == mode
            assert f"| {run['config']} | {mode} |" in table
            runs[mode, run["config"]] = run
    assert set(runs) == {(m, DEMOS[0]) for m in BACKPROP_MODES} | {("reversible", DEMOS[1])}

    for config in DEMOS:
        reference = runs["reversible", config]
        params, flops = reference["params"], reference["flops"]
        assert params["model"] > params["backbone"] > params["trunk"] > 0
        assert flops["model"] > flops["backbone"] > flops["trunk"] > 0
        assert 0 < flops["trunk_at_size"] < flops["trunk"]  # 64x64 against 128x192
    for mode in BACKPROP_MODES:
        assert runs[mode, DEMOS[0]]["params"] == runs["reversible", DEMOS[0]]["params"]
        assert runs[mode, DEMOS[0]]["flops"] == runs["reversible", DEMOS[0]]["flops"]
    # RevViT's global block folds the relative position bias into wider q and k; the count
    # with the bias explicit is the smaller one. RevMViT has no such second count.
    vit = runs["reversible", DEMOS[0]]["flops"]
    assert 0 < vit["trunk_explicit"] < vit["trunk"]
    assert "trunk_explicit" not in runs["reversible", DEMOS[1]]["flops"]
