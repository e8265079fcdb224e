"""tools/gpu_check.sh --dry-run: every stage of the GPU check runs on CPU and leaves its results."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "gpu_check"
    env = dict(os.environ, PYTHON=sys.executable)
    script = os.path.join(ROOT, "tools", "gpu_check.sh")
    proc = subprocess.run(["bash", script, "--dry-run", str(out)], env=env, timeout=600)
    assert proc.returncode == 0
    log = (out / "gpu_check.log").read_text()
    for stage in ("environment", "test_gpu", "speed-fp32", "speed-bf16", "whole-step"):
        assert f"=== {stage}: exit 0" in log, stage
    for precision, label in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
        report = (out / precision / "results.md").read_text()
        assert f"; {label}\n" in report
        assert "| reversible | reversible | 2 |" in report
    assert "| reversible/reversible | True |" in (out / "whole_step" / "results.md").read_text()
