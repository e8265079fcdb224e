"""rev_det.benchmark and its command line tools/benchmark.py on tiny models: every mode in the
tables, memory ordering, flat depth."""

import mmap
import os

import pytest
from helpers import load_script

from rev_det.benchmark import (
    HAS_VITDET,
    MODES,
    SECTIONS,
    GiB,
    MemoryBudget,
    budgeted,
    largest_batch,
)
from rev_det.benchmark.measure import kernel_work, paired_ratio
from rev_det.benchmark.sections.classification import marginal_per_image
from rev_det.benchmark.sections.speed import SpeedRun, speed_runs

cli = load_script("tools", "benchmark")  # the command line whose options and output are tested

TINY = [
    "MODEL.REVVIT.EMBED_DIM", "96", "MODEL.REVVIT.NUM_HEADS", "3", "MODEL.REVVIT.DEPTH", "8",
    "MODEL.REVVIT.WINDOW_SIZE", "4", "MODEL.REVVIT.WINDOW_BLOCK_INDEXES", "[0, 1, 2, 4, 5, 6]",
    "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.NUM_CONV", "0",
    "MODEL.ROI_MASK_HEAD.NUM_CONV", "1",
]  # fmt: skip


def read(path):
    with open(path) as f:
        return f.read()


def test_detection_and_depth_every_mode_memory_ordering_flat_depth(tmp_path):
    out = str(tmp_path / "bench")
    args = ["--backbone", "rev_vit_b", "--size", "256", "--sections", "detection", "depth"]
    # From depth 8 on every depth has the same mix of window and global blocks.
    args += ["--depths", "8", "16", "--out", out, "--opts", *TINY]
    results = cli.main(args)

    runs = {(r["backprop"], r["pyramid"]): r for r in results["detection"]}
    assert list(runs) == [
        ("autograd", "simple"),
        ("checkpoint", "simple"),
        ("autograd", "reversible"),
        ("checkpoint", "reversible"),
        ("reversible", "reversible"),
    ]
    assert all(r["measured"] for r in runs.values())
    backbone = {k: r["backbone_activations"] for k, r in runs.items()}
    assert backbone[("reversible", "reversible")] < backbone[("checkpoint", "simple")]
    assert backbone[("checkpoint", "simple")] < backbone[("autograd", "simple")]
    step = {k: r["step_peak"] for k, r in runs.items()}
    assert step[("reversible", "reversible")] < step[("checkpoint", "simple")]
    assert step[("checkpoint", "simple")] < step[("autograd", "simple")]
    assert runs[("reversible", "reversible")]["vs_baseline"] > 1.0

    depth = {(r["backprop"], r["depth"]): r["activations"] for r in results["depth"]}
    assert depth[("reversible", 16)] <= 1.05 * depth[("reversible", 8)]
    assert depth[("checkpoint", 16)] > depth[("checkpoint", 8)]
    assert depth[("autograd", 16)] >= 1.5 * depth[("autograd", 8)]

    report = read(os.path.join(out, "results.md"))
    for backprop, pyramid in runs:
        assert f"| {backprop} | {pyramid} |" in report
    for mode in MODES:
        assert f"| {mode} | none | 16 |" in report
    assert os.path.isfile(os.path.join(out, "memory_vs_depth.png"))
    assert results["command"] in report and results["machine"] in report
    assert results["torch"] in report


def test_classification_per_image_ordering_and_marginal(tmp_path):
    out = str(tmp_path / "cls")
    args = ["--sections", "classification", "--classifiers", "vit_ti", "--cls-batches", "1", "2"]
    results = cli.main(args + ["--out", out])

    rows = {(r["backprop"], r["batch"]): r for r in results["classification"]}
    assert set(rows) == {(m, b) for m in ("plain", *MODES) for b in (1, 2)}
    for batch in (1, 2):
        per_image = {m: rows[(m, batch)]["per_image"] for m in ("plain", *MODES)}
        assert per_image["reversible"] < per_image["checkpoint"] < per_image["autograd"]
        # The plain ViT (one stream, the paper's baseline) stores a little less than the
        # two-stream model with autograd (both keep the same attention and MLP internals per
        # block; the second stream adds its sums), far more than reversible.
        assert per_image["reversible"] < per_image["plain"] < per_image["autograd"]
    # Autograd stores every block's activations for each image: its per-image memory is ~flat.
    for mode in ("plain", "autograd"):
        assert rows[(mode, 2)]["per_image"] == pytest.approx(rows[(mode, 1)]["per_image"], rel=0.1)
    marginal = marginal_per_image(results["classification"])
    slope, _, b0, b1 = marginal[("vit_ti", "reversible")]
    assert (b0, b1) == (1, 2)
    assert slope == pytest.approx(
        rows[("reversible", 2)]["activations"] - rows[("reversible", 1)]["activations"]
    )
    report = read(os.path.join(out, "results.md"))
    assert "vit_ti, marginal" in report and "vit_ti, batch 2: plain" in report
    assert os.path.isfile(os.path.join(out, "memory_per_image_vs_batch.png"))


def test_depth_override_keeps_a_named_sizes_attention_layout():
    """Configs name their size (MODEL.REVVIT.SIZE "B") and leave the size keys unset; the
    benchmark's depth override starts from the named size."""
    from rev_det.benchmark.detectors import detector_cfg
    from rev_det.benchmark.sections.depth import trunk_model
    from rev_det.modeling import vit_trunk_args

    cfg = detector_cfg("rev_vit_b", "reversible", "reversible", "cpu", depth=6)
    sized = vit_trunk_args(cfg)
    # ViT-B's global blocks are every third (2, 5, 8, 11): at depth 6, blocks 2 and 5.
    assert sized["depth"] == 6 and sized["window_block_indexes"] == (0, 1, 3, 4)
    assert sized["embed_dim"] == 768

    class Det:
        options = type("Options", (), {"size": 64, "device": "cpu"})

        @staticmethod
        def cfg(backprop, pyramid):
            return detector_cfg("rev_vit_b", backprop, pyramid, "cpu")

    trunk = trunk_model(Det, 3, "reversible")
    assert len(list(trunk.blocks.children())) == 3 and trunk.patch_embed.proj.out_channels == 768


def test_budget_skips_with_the_prediction_and_never_runs():
    budget = MemoryBudget(1.0)
    series = ("depth", "autograd", "simple", 1024)
    budget.record([(series, 6)], 0.2 * GiB)
    budget.record([(series, 12)], 0.5 * GiB)
    assert budget.predict(series, 18) == pytest.approx(0.8 * GiB)

    def run():
        raise AssertionError("a run over the budget must not start")

    row = budgeted(budget, [(series, 24)], 100.0, "test", run)
    assert not row["measured"] and row["predicted_along"] == "depth"
    assert row["predicted_peak"] == pytest.approx(1.1 * 1024 - 100.0)
    fits = budgeted(budget, [(series, 18)], 100.0, "test", lambda: {"peak": 500.0})
    assert fits == {"measured": True, "peak": 500.0}


def test_largest_batch_doubles_then_bisects():
    calls = []

    def fits(batch):
        calls.append(batch)
        return batch <= 37

    assert largest_batch(fits, limit=512) == (37, [1, 2, 4, 8, 16, 32])
    assert max(calls) <= 64
    assert largest_batch(fits, limit=20) == (20, [1, 2, 4, 8, 16])
    assert largest_batch(lambda b: False, limit=512) == (0, [])


def test_speed_section_adds_the_parallel_backward_run_on_cuda():
    runs = [("autograd", "simple"), ("checkpoint", "simple"), ("reversible", "reversible")]
    assert speed_runs(runs, "cuda") == [
        ("autograd", "simple", False),
        ("checkpoint", "simple", False),
        ("reversible", "reversible", False),
        ("reversible", "reversible", True),
    ]
    assert speed_runs(runs, "cpu") == [(*run, False) for run in runs]


def test_speed_section_times_each_detector_interleaved_with_its_peak(tmp_path, monkeypatch):
    out = str(tmp_path / "speed")
    order = []
    step = SpeedRun.step

    def recorded(run, data):
        inner = step(run, data)
        return lambda: (order.append((run.label, len(data))), inner())

    monkeypatch.setattr(SpeedRun, "step", recorded)
    args = ["--size", "128", "--sections", "speed", "--speed-batches", "1", "2", "--no-vitdet"]
    args += ["--repeats", "2", "--warmup", "2", "--out", out, "--opts", *TINY]
    results = cli.main(args)

    labels = ["autograd", "checkpoint", "reversible"]
    rows = results["speed"]
    assert [(r["backprop"], r["batch"]) for r in rows] == [(b, n) for n in (1, 2) for b in labels]
    assert all(len(r["times"]) == 2 and r["step_s"] > 0 for r in rows)
    assert rows[0]["vs_first"] == 1.0
    peak = {(r["backprop"], r["batch"]): r["peak"] for r in rows}
    assert peak["reversible", 1] < peak["autograd", 1] < peak["autograd", 2]
    # One untimed step of each (the other warm-up measures memory), then the timed steps in turn.
    assert order[:9] == [(b, 1) for b in labels] + [(b, 1) for b in labels] * 2
    assert "largest_batch" not in results
    report = read(os.path.join(out, "results.md"))
    assert "## Speed at 128x128" in report and "| reversible | reversible | 2 |" in report
    assert os.path.isfile(os.path.join(out, "throughput_vs_batch.png"))


def test_every_section_of_the_registry_is_offered_and_described(capsys):
    assert cli.parse_args(["--sections", *SECTIONS]).sections == list(SECTIONS)
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in SECTIONS:
        assert text.count(f"\n{name}\n    ") == 1, name


def test_the_library_takes_options_with_the_command_lines_defaults():
    from rev_det.benchmark import BenchmarkOptions

    options = BenchmarkOptions(device="cpu", sections=["whole_step"])
    assert options.out.endswith(os.path.join("benchmarks", "rev_vit_b_1024_cpu"))
    assert options.budget_gib > 0 and options.size == 1024 and options.vitdet
    # Flags not given take the options' defaults: one place for them.
    assert cli.parse_args(["--device", "cpu", "--sections", "whole_step"]) == options
    with pytest.raises(ValueError, match="unknown sections"):
        BenchmarkOptions(sections=["memory"])
    with pytest.raises(ValueError, match="warmup and repeats"):
        BenchmarkOptions(warmup=0)


def test_speed_arguments_are_checked():
    with pytest.raises(SystemExit):
        cli.parse_args(["--warmup", "0"])


def test_speed_section_times_detectron2s_vitdet_first_where_it_exists(tmp_path):
    args = ["--size", "128", "--sections", "speed", "--repeats", "1", "--warmup", "1"]
    results = cli.main(args + ["--out", str(tmp_path), "--opts", *TINY])
    rows = [(r["backprop"], r["pyramid"]) for r in results["speed"]]
    # Each timed step's page faults and system time are recorded beside its time.
    for r in results["speed"]:
        assert len(r["page_faults"]) == len(r["system_times"]) == len(r["times"]) == 1
        assert r["page_faults_k"] == r["page_faults"][0] / 1000 and r["system_s"] >= 0
    # "## Speed ...", "", the header, "|---|...", then a line per row.
    table = open(os.path.join(tmp_path, "results.md")).read().split("## Speed")[1].split("\n")
    columns = [c.strip() for c in table[2].split("|")]
    if not HAS_VITDET:  # Detectron2 v0.6
        assert rows == [("autograd", "simple"), ("checkpoint", "simple")] + [
            ("reversible", "reversible")
        ]
        assert "vs_vitdet_ckpt" not in columns
        return
    # The ratio to ViTDet's checkpointed step, paired round by round, is a column of the table.
    checkpointed = [c.strip() for c in table[5].split("|")]
    assert checkpointed[columns.index("vs_vitdet_ckpt")] == "1.00x"
    vitdet = "ViTDet (Detectron2)"
    assert rows[:2] == [("autograd", vitdet), ("checkpoint", vitdet)]
    peak = {row: r["peak"] for row, r in zip(rows, results["speed"])}
    # Checkpointing stores one tensor per block instead of every activation.
    assert peak[("checkpoint", vitdet)] < peak[("autograd", vitdet)]
    # The same trunk width and heads: ViTDet's autograd step and rev_det's (two streams) differ
    # by less than 2x in memory.
    assert 0.5 < peak[("autograd", "simple")] / peak[("autograd", vitdet)] < 2.0


def test_kernel_work_counts_the_page_faults_of_fresh_memory():
    record = []

    def touch_fresh_pages():
        pages = mmap.mmap(-1, 1024 * mmap.PAGESIZE)  # anonymous: mapped on first write
        pages[:: mmap.PAGESIZE] = b"x" * 1024
        pages.close()

    step = kernel_work(touch_fresh_pages, record)
    step()
    step()
    assert len(record) == 2
    assert all(faults >= 1 and system >= 0 for faults, system in record)


def test_attention_speed_methods_are_exact_in_float64():
    """tools/attention_speed.py compares only exact methods: outputs and every gradient agree."""
    import torch

    tool = load_script("tools", "attention_speed")
    torch.manual_seed(0)
    grid, d = 6, 8
    q, k, v = (torch.randn(1, 2, grid * grid, d, dtype=torch.float64) for _ in range(3))
    tables = [torch.randn(2 * grid - 1, d, dtype=torch.float64) for _ in range(2)]
    results = {}
    for name in tool.methods(grid, *tables, tile=10):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, *tables)]
        out = tool.methods(grid, *inputs[3:], tile=10)[name](*inputs[:3])
        out.pow(2).sum().backward()
        results[name] = [out] + [t.grad for t in inputs]
    assert set(results) == {"fold", "mask", "explicit", "tiled"}
    for name, tensors in results.items():
        for got, want in zip(tensors, results["explicit"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


def test_speed_ratios_pair_the_steps_of_each_round():
    """A machine twice as slow in one round moves both steps of that round: the paired ratio
    stays 1.1, where the ratio of the medians (22 / 10) would report 2.2."""
    reference, seconds = [10.0, 20.0, 10.0], [11.0, 22.0, 33.0]
    assert paired_ratio(seconds, reference) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        paired_ratio(seconds, reference[:2])


def test_whole_step_counts_adamw_state_and_the_step_in_backward_frees_the_gradients(tmp_path):
    out = str(tmp_path / "bench")
    args = ["--backbone", "rev_vit_b", "--size", "64", "--sections", "whole_step"]
    # A wide trunk on small images, so that gradients outweigh the activations as in ViT-L and
    # ViT-H at 1024, and no one parameter dominates (AdamW's temporaries are per parameter).
    args += ["--out", out, "--opts", *TINY]
    args += ["MODEL.REVVIT.EMBED_DIM", "384", "MODEL.REVVIT.NUM_HEADS", "6"]
    args += ["MODEL.ROI_BOX_HEAD.FC_DIM", "256", "--whole-step-rounds", "1"]
    rows = {(r["detector"], r["step_in_backward"]): r for r in cli.main(args)["whole_step"]}
    detectors = ["autograd/simple", "checkpoint/simple", "reversible/reversible"]
    assert sorted(rows) == sorted((d, flag) for d in detectors for flag in (False, True))
    # AdamW's two moments (and a step counter per parameter) are twice the parameters.
    for r in rows.values():
        assert 2 * r["params"] <= r["optimizer_state"] < 2.01 * r["params"]
        assert r["whole_step_peak"] == pytest.approx(
            r["params"] + r["optimizer_state"] + r["step_peak"]
        )
    for detector in detectors:
        after, inside = rows[detector, False], rows[detector, True]
        # The switch never raises the peak, in any mode.
        assert inside["whole_step_peak"] <= after["whole_step_peak"], detector
        assert inside["time_vs_after"] > 0 and after["seconds"] > 0  # timed in paired rounds
    # After backward the step holds every gradient at once (kept through the next forward, as
    # Detectron2's trainer does); inside backward it never does. (Here the heads' activations
    # at the peak are 1.5x the parameters, so not all of the saving shows in the peak.)
    after, inside = rows["reversible/reversible", False], rows["reversible/reversible", True]
    assert after["step_peak"] > after["params"]
    assert after["whole_step_peak"] - inside["whole_step_peak"] > 0.5 * after["params"]
    assert "| reversible/reversible | True |" in read(os.path.join(out, "results.md"))


def test_breakdown_parts_add_up_to_what_the_step_keeps_and_recomputed_heads_keep_less(tmp_path):
    def breakdown(*opts):
        args = ["--backbone", "rev_vit_b", "--size", "128", "--sections", "breakdown"]
        args += ["--out", str(tmp_path / str(len(opts))), "--opts", *TINY, *opts]
        return cli.main(args)["breakdown"]

    plain = breakdown()
    kept = {r["part"]: r["kept"] for r in plain["rows"]}
    assert list(kept) == ["trunk + pyramid", "RPN", "box head", "mask head", "rest of the forward"]
    assert sum(kept.values()) == pytest.approx(plain["stored"])
    assert all(kept[p] > 0 for p in ("trunk + pyramid", "RPN", "box head"))
    assert plain["step_peak"] >= plain["forward_peak"] >= plain["stored"]
    recomputed = breakdown("MODEL.REV.RECOMPUTE_HEADS", "True", "MODEL.ROI_BOX_HEAD.NUM_CONV", "2")
    with_convs = breakdown("MODEL.ROI_BOX_HEAD.NUM_CONV", "2")
    kept_r = {r["part"]: r["kept"] for r in recomputed["rows"]}
    kept_c = {r["part"]: r["kept"] for r in with_convs["rows"]}
    assert kept_r["trunk + pyramid"] == pytest.approx(kept_c["trunk + pyramid"])
    assert kept_r["box head"] < 0.5 * kept_c["box head"]
    assert kept_r["RPN"] < kept_c["RPN"]
    assert recomputed["stored"] < with_convs["stored"]
