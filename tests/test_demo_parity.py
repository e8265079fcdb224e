"""tools/demo_parity.py: it tabulates finished runs and, with --no-train, trains none."""

import json
from types import SimpleNamespace

from helpers import load_script

parity = load_script("tools", "demo_parity")


def test_no_train_tabulates_the_finished_runs_only(tmp_path, monkeypatch, capsys):
    finished = tmp_path / "reversible_reversible_seed42"
    finished.mkdir()
    records = [{"iteration": 19, "total_loss": 2.0}, {"bbox/AP": 41.25, "segm/AP": 37.5}]
    (finished / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (tmp_path / "autograd_simple_seed42").mkdir()  # started, no final AP yet

    def no_training(*args, **kwargs):
        raise AssertionError("--no-train started a training run")

    monkeypatch.setattr(parity, "subprocess", SimpleNamespace(run=no_training))
    runs = parity.main(["--seeds", "42", "--no-train", "--out", str(tmp_path)])

    assert [(r["backprop"], r["seed"], r["box_ap"], r["mask_ap"]) for r in runs] == [
        ("reversible", 42, 41.25, 37.5)
    ]
    assert runs[0]["mib_per_image"] > 0  # measured, not read from the run
    assert "autograd_simple_seed42 has no final AP yet" in capsys.readouterr().out
    table = (tmp_path / "results.md").read_text()
    assert "| reversible + reversible | 41.2 | 37.5 |" in table
    assert "autograd + simple" not in table
