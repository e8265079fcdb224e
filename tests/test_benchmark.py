"""tools/benchmark.py on a tiny model: every mode in the table, and the memory ordering."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchmark  # noqa: E402

TINY = [
    "MODEL.REVVIT.EMBED_DIM", "96", "MODEL.REVVIT.NUM_HEADS", "3", "MODEL.REVVIT.DEPTH", "8",
    "MODEL.REVVIT.WINDOW_SIZE", "4", "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", "[0, 1, 2, 4, 5, 6]",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.NUM_CONV", "0",
    "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
]  # fmt: skip


def test_benchmark_table_has_every_mode_and_memory_ordering(tmp_path):
    out = str(tmp_path / "bench")
    args = ["--backbone", "rev_vit_b", "--size", "256", "--sections", "detection", "depth"]
    # From depth 8 on every depth has the same mix of window and global blocks.
    args += ["--depths", "8", "16", "--out", out, "--opts", *TINY]
    results = benchmark.main(args)

    runs = {(r["backprop"], r["pyramid"]): r for r in results["detection"]}
    assert set(runs) == set(benchmark.DETECTION_RUNS)
    peak = {k: r["backbone_activations"] for k, r in runs.items()}
    assert peak[("reversible", "reversible")] < peak[("checkpoint", "simple")]
    assert peak[("checkpoint", "simple")] < peak[("autograd", "simple")]

    depth = {(r["backprop"], r["depth"]): r["activations"] for r in results["depth"]}
    assert depth[("reversible", 16)] <= 1.05 * depth[("reversible", 8)]
    assert depth[("autograd", 16)] >= 1.5 * depth[("autograd", 8)]

    with open(os.path.join(out, "results.md")) as f:
        report = f.read()
    for mode in benchmark.MODES:
        assert f"| {mode} |" in report
    assert os.path.isfile(os.path.join(out, "memory_vs_depth.png"))
    assert "tools/benchmark.py" in report and results["machine"] in report
