"""tools/reconstruction_drift.py: per-block drift of rebuilt inputs, its tables, JSON and plot."""

import json
import os
import sys

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import reconstruction_drift  # noqa: E402


def test_drift_tool_writes_per_block_errors(tmp_path):
    out = str(tmp_path / "drift")
    argv = ["--depths", "2", "3", "--scales", "1", "2", "--size", "64", "--out", out]
    reconstruction_drift.main(argv)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert set(results["drift"]) == {"init", "init x2"}
    for variant in results["drift"].values():
        for depth in (2, 3):
            errors = variant[str(depth)]
            assert set(errors) == {"fp32", "bf16", "fp16"}
            assert all(len(e) == depth and len(e[0]) == 2 for e in errors.values())
            # Rounding only in fp32; F and G in half precision round far more.
            assert 0 <= errors["fp32"][0][0] < 1e-5
            assert errors["bf16"][0][0] > 10 * errors["fp32"][0][0]
    text = open(os.path.join(out, "results.md")).read()
    assert "## Weights: init x2" in text and "| 3 |" in text and results["torch"] in text
    assert os.path.getsize(os.path.join(out, "drift.png")) > 0
