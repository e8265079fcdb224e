"""rev_det.predict (tools/predict.py): the demo's model on my own pictures, from yacs and
LazyConfig files; bad inputs reported while the others are still processed."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import DEMO_LAZY, DEMO_MVIT, DEMO_YAML, TINY_LAZY, TINY_YACS, yacs_cfg
from PIL import Image

from rev_det import predict
from rev_det.runs import Trainer


def pictures(folder, n=2):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.integers(0, 255, (120 + 10 * i, 150, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(folder, f"photo{i}.png"))
    return folder


def weights_of(cfg, path):
    torch.manual_seed(0)
    torch.save({"model": Trainer.build_model(cfg).state_dict()}, path)
    return path


def test_yacs_model_on_a_folder_and_a_broken_file_draws_the_rest(tmp_path, capsys):
    weights = weights_of(yacs_cfg(DEMO_YAML, *TINY_YACS), str(tmp_path / "model_final.pth"))
    folder = pictures(str(tmp_path / "in"))
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = str(tmp_path / "out")
    status = predict.main(
        ["--config-file", DEMO_YAML, "--input", folder, "--output", out]
        + ["--confidence-threshold", "0.0", "--opts", *TINY_YACS, "MODEL.WEIGHTS", weights]
    )
    assert status == 1  # one input failed
    assert "broken.jpg: cannot read it as an image" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["photo0.png", "photo1.png", "results.json"]
    drawn = Image.open(os.path.join(out, "photo1.png"))
    assert drawn.size == (150, 130)  # the input's size, not the model's
    results = json.load(open(os.path.join(out, "results.json")))
    assert results and {r["file_name"] for r in results} <= {
        os.path.join(folder, f) for f in ("photo0.png", "photo1.png")
    }
    assert {"bbox", "score", "category_id", "segmentation"} <= set(results[0])
    assert all(r["score"] >= 0.0 for r in results)


def test_lazy_config_and_a_threshold_print_the_detections(tmp_path, capsys):
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.apply_overrides(LazyConfig.load(DEMO_LAZY), TINY_LAZY)
    torch.manual_seed(0)
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": instantiate(cfg.model).state_dict()}, path)
    image = os.path.join(pictures(str(tmp_path / "in"), 1), "photo0.png")
    opts = [*TINY_LAZY, f"train.init_checkpoint={path}"]
    status = predict.main(["--config-file", DEMO_LAZY, "--input", image, "--opts", *opts])
    assert status == 0
    assert f"{image}: " in capsys.readouterr().out


def test_weights_of_another_model_and_missing_inputs_are_named(tmp_path, capsys):
    other = weights_of(yacs_cfg(DEMO_MVIT), str(tmp_path / "mvit.pth"))
    with pytest.raises(ValueError, match=r"lacks \d+ of this model's weights.*not a checkpoint"):
        predict.Predictor(DEMO_YAML, [*TINY_YACS, "MODEL.WEIGHTS", other])
    with pytest.raises(ValueError, match="No weights to predict with: set MODEL.WEIGHTS"):
        predict.Predictor(DEMO_YAML, TINY_YACS)
    (tmp_path / "empty").mkdir()
    args = ["--config-file", DEMO_YAML, "--opts", *TINY_YACS]
    assert predict.main(["--input", str(tmp_path / "empty"), *args]) == 2
    assert "the folder has no images" in capsys.readouterr().err
    assert predict.main(["--input", str(tmp_path / "nothing*.jpg"), *args]) == 2
    assert "no such file, folder or glob match" in capsys.readouterr().err
