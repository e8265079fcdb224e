"""End to end through projects/train_net.py and projects/lazyconfig_train_net.py on CPU."""

import json
import os
import sys

import pytest
import torch
from helpers import (
    DEMO_LAZY,
    DEMO_MVIT,
    DEMO_YAML,
    ROOT,
    TINY_LAZY,
    TINY_YACS,
    copypaste_ap,
    run,
)

sys.path.insert(0, os.path.join(ROOT, "tools"))

from demo_equivalence import demo_gradients, demo_losses, relative_differences  # noqa: E402

pytestmark = pytest.mark.slow


def losses(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r]


@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_train_resume_evaluate_and_eval_only(entry, datasets_root, tmp_path):
    out = str(tmp_path / "out")
    if entry == "yacs":
        script, cfg = "train_net.py", ["--config-file", DEMO_YAML]

        def opts(max_iter, **extra):
            return TINY_YACS + ["SOLVER.MAX_ITER", str(max_iter), "OUTPUT_DIR", out]

    else:
        script, cfg = "lazyconfig_train_net.py", ["--config-file", DEMO_LAZY]

        def opts(max_iter, **extra):
            return TINY_LAZY + [f"train.max_iter={max_iter}", f"train.output_dir={out}"]

    first = run(script, cfg + opts(40), datasets_root)
    record = losses(out)
    assert [i for i, _ in record] == [19, 39]
    assert record[-1][1] < record[0][1]  # the training loss falls
    trained = copypaste_ap(first)
    assert set(trained) == {"bbox", "segm"}, first[-2000:]
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "coco_instances_results.json")) or os.path.isfile(
        os.path.join(out, "inference", "coco_instances_results.json")
    )

    # --resume continues from the last checkpoint (iteration 40) up to the new max_iter.
    resumed = run(script, cfg + ["--resume"] + opts(60), datasets_root)
    assert "Starting training from iteration 40" in resumed
    assert [i for i, _ in losses(out)] == [19, 39, 59]

    # --eval-only reloads the final weights and reproduces the AP of the end of training.
    weights = os.path.join(out, "model_final.pth")
    if entry == "yacs":
        evaluated = run(
            script, cfg + ["--eval-only"] + opts(60) + ["MODEL.WEIGHTS", weights], datasets_root
        )
    else:
        evaluated = run(
            script,
            cfg + ["--eval-only"] + opts(60) + [f"train.init_checkpoint={weights}"],
            datasets_root,
        )
    assert copypaste_ap(evaluated) == copypaste_ap(resumed)


def test_demo_reversible_and_autograd_losses_agree_for_20_iterations():
    """The demo config trained 20 AdamW iterations with backprop "reversible" and "autograd".

    Run in float64: in float32 the two agree to ~1e-7 until a rounding-level difference flips
    a discrete choice of Mask R-CNN (top-k proposals, NMS, ROI sampling), after which any two
    runs part by >1e-3. Autograd against itself with weights perturbed by 1e-7 (relative) does
    the same from the 4th iteration (measured, see docs/demo.md, "Demo equivalence"), so the 1e-3
    criterion over 20 iterations is only meaningful where rounding is far below it.
    """
    autograd, reversible = demo_losses(DEMO_YAML, ("autograd", "reversible"), 20, torch.float64)
    assert max(relative_differences(autograd, reversible)) <= 1e-9, (autograd, reversible)


def test_demo_float32_step_gradients_of_reversible_and_checkpoint_equal_autograd():
    """In float32 (the demo's dtype), one step of the demo config from the same weights, batch
    and RNG state: every gradient of "reversible" equals autograd's to rounding, and
    "checkpoint" (which re-runs the same forward) equals it bit for bit.

    Losses several steps later are no such test: a rounding-level difference can flip one of
    Mask R-CNN's discrete choices, after which any two runs part (see the float64 test above).
    """
    modes = ("autograd", "reversible", "checkpoint")
    autograd, reversible, checkpoint = demo_gradients(DEMO_YAML, modes, torch.float32)
    assert autograd.keys() == reversible.keys() == checkpoint.keys()
    assert any(k.startswith("backbone.net.blocks.") for k in autograd)
    scale = torch.cat([g.flatten() for g in autograd.values()]).norm()
    for name, g in autograd.items():
        error = (reversible[name] - g).norm()
        # Rounding of the rebuilt activations (~1e-7 relative) reaches the gradients; a wrong
        # recomputation (a swapped stream, stale RNG) is off by the order of the gradient.
        assert error <= 1e-4 * g.norm() + 1e-6 * scale, (name, error, g.norm())
        assert torch.equal(checkpoint[name], g), name


@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_rev_mvit_demo_trains_and_evaluates(entry, datasets_root, tmp_path):
    out = str(tmp_path / "out")
    if entry == "yacs":
        script, cfg = "train_net.py", ["--config-file", DEMO_MVIT]
        opts = ["SOLVER.MAX_ITER", "20", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", out]
        opts += ["INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160"]
        opts += ["DATALOADER.NUM_WORKERS", "0"]
    else:
        script, cfg = "lazyconfig_train_net.py", [
            "--config-file",
            DEMO_MVIT.replace(".yaml", ".py"),
        ]
        opts = [o for o in TINY_LAZY if not o.startswith("model.")]
        opts += ["train.max_iter=40", f"train.output_dir={out}"]
    log = run(script, cfg + opts, datasets_root)
    assert "RevMViT" in log
    assert set(copypaste_ap(log)) == {"bbox", "segm"}


@pytest.mark.parametrize("entry", ["yacs", "lazy"])
def test_bf16_amp_and_reconstruction_check_through_the_entry_points(entry, datasets_root, tmp_path):
    """SOLVER.AMP / train.amp train in bfloat16 on CPU (v0.6's AMPTrainer is CUDA-only) and the
    reconstruction check logs the drift of the reversible blocks."""
    out = str(tmp_path / "out")
    if entry == "yacs":
        script, args = "train_net.py", ["--config-file", DEMO_YAML, *TINY_YACS]
        args += ["SOLVER.MAX_ITER", "20", "OUTPUT_DIR", out, "SOLVER.AMP.ENABLED", "True"]
        args += ["SOLVER.AMP.PRECISION", "bfloat16", "MODEL.REV.CHECK_RECONSTRUCTION.PERIOD", "5"]
    else:
        script, args = "lazyconfig_train_net.py", ["--config-file", DEMO_LAZY, *TINY_LAZY]
        args += ["train.max_iter=40", f"train.output_dir={out}", "train.amp.enabled=True"]
        args += ["train.amp.precision=bfloat16", "train.check_reconstruction.period=5"]
    run(script, args, datasets_root)
    with open(os.path.join(out, "metrics.json")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    drift = [r["reversible/max_rel_error"] for r in records if "reversible/max_rel_error" in r]
    assert drift and all(0 <= d < 0.1 for d in drift), records
    assert all(torch.isfinite(torch.tensor(r["total_loss"])) for r in records if "total_loss" in r)
