"""tools/demo_parity.py: it tabulates finished runs and, with --no-train, trains none; it
evaluates each finished run on the test set once."""

import json
from types import SimpleNamespace

import pytest
import torch
from detectron2.data import DatasetCatalog
from helpers import DEMO_YAML, load_script, yacs_cfg

from rev_det.data import SHAPES_TEST_DATASET
from rev_det.demo import shapes

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

    assert [(r["variant"], r["seed"], r["box_ap"], r["mask_ap"]) for r in runs] == [
        ("reversible_reversible", 42, 41.25, 37.5)
    ]
    assert runs[0]["mib_per_image"] > 0  # measured, not read from the run
    assert "autograd_simple_seed42 has no final AP yet" in capsys.readouterr().out
    table = (tmp_path / "results.md").read_text()
    # No final weights in the folder: not evaluated on the test set.
    assert "| reversible + reversible | - | - | 41.2: 41.2 (0.0) | 37.5: 37.5 (0.0) |" in table
    assert "autograd + simple" not in table


def test_a_finished_run_is_evaluated_on_the_test_set_once(shapes_registered, tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "SHAPES_TEST_SIZE", 3)
    opts = ["MODEL.REV.BACKPROP", "autograd", "MODEL.REV.PYRAMID", "simple"]
    torch.manual_seed(0)
    model = parity.Trainer.build_model(yacs_cfg(DEMO_YAML, *opts))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"model": model.state_dict()}, run_dir / "model_final.pth")

    ap = parity.test_ap(DEMO_YAML, opts, str(run_dir))
    assert set(ap) == {"bbox", "segm"} and all(0 <= v <= 100 for v in ap.values())
    assert len(DatasetCatalog.get(SHAPES_TEST_DATASET)) == 3  # what it was evaluated on
    monkeypatch.setattr(parity.Trainer, "test", lambda *a: pytest.fail("evaluated again"))
    assert parity.test_ap(DEMO_YAML, opts, str(run_dir)) == ap


def test_surrogate_experiment_variants_start_from_one_plain_vit(tmp_path):
    """The surrogate experiment's three variants: the plain ViT and the surrogate load the
    pretrained plain trunk whole, the RevViT its --source vit conversion (all but the fusion norm);
    the plain ViT stays at (1, 0) with autograd."""
    cfg = yacs_cfg(parity.VITDET_DEMO_CONFIG)
    torch.manual_seed(0)
    trunk = parity.Trainer.build_model(cfg).backbone.net
    exported = {f"backbone.net.{k}": v.half() for k, v in trunk.state_dict().items()}
    torch.save({"model": exported}, tmp_path / "plain_vit_trunk.pth")  # as pretrain_trunk exports

    variants = {v.name: v for v in parity.surrogate_variants(str(tmp_path), 1)}
    assert list(variants) == ["plain", "converted", "surrogate"]
    for name, variant in variants.items():
        model = parity.Trainer.build_model(parity._cfg(variant.config, variant.opts))
        weights = variant.opts[variant.opts.index("MODEL.WEIGHTS") + 1]
        strict = name != "converted"  # RevViT's fusion norm has no counterpart in a ViT
        parity.load_weights(model, str(tmp_path), weights, strict_load=strict, resume=False)
        loaded = model.backbone.net.state_dict()
        assert torch.equal(
            loaded["blocks.1.mlp.fc2.weight"], trunk.blocks[1].mlp.fc2.weight.half().float()
        )
        assert torch.equal(
            loaded["patch_embed.stem.0.weight"], trunk.patch_embed.stem[0].weight.half().float()
        )
    plain = parity._cfg(variants["plain"].config, variants["plain"].opts)
    assert plain.MODEL.REV.BACKPROP == "autograd" and tuple(plain.MODEL.REV.COUPLING.BETA) == (0, 0)


def test_three_or_more_seeds_give_mean_and_sample_standard_deviation():
    assert parity._stat([20.0, 22.0, 24.0]) == "20.0 / 22.0 / 24.0: 22.0 ± 2.0"
    assert parity._stat([19.0, 21.5]) == "19.0 / 21.5: 20.2 (2.5)"
    assert parity._stat([]) == "-"
