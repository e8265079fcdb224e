"""The named contracts: BackpropModule (a checked backprop mode, one recompute rule) and
TwoStreamTrunk (what the pyramids build on)."""

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone
from helpers import tiny_cfg

from rev_det.modeling import (
    RecomputedFPN,
    ReversibleFeaturePyramid,
    RevMViT,
    RevViT,
    TwoStreamTrunk,
    build_rev_vit_backbone,
    set_backprop,
)
from rev_det.reversible import BackpropModule, ReversibleSequence, check_backprop


def test_every_backprop_owner_is_a_backprop_module_and_set_backprop_reaches_all():
    cfg = tiny_cfg()
    backbone = build_rev_vit_backbone(cfg, ShapeSpec(channels=3))
    owners = [m for m in backbone.modules() if isinstance(m, BackpropModule)]
    kinds = {type(m) for m in owners}
    assert {ReversibleFeaturePyramid, RevViT, ReversibleSequence} <= kinds
    set_backprop(backbone, "checkpoint")
    assert {m.backprop for m in owners} == {"checkpoint"}
    # RevViT's mode is its block sequence's: one value, however it is set.
    backbone.net.backprop = "autograd"
    assert backbone.net.blocks.backprop == "autograd"
    assert issubclass(RevMViT, BackpropModule) and issubclass(RecomputedFPN, BackpropModule)


def test_a_wrong_mode_is_refused_with_its_key_and_the_valid_modes():
    with pytest.raises(ValueError, match=r"MODEL.REV.BACKPROP = 'fast' is not valid.*reversible"):
        check_backprop("fast", "MODEL.REV.BACKPROP")
    cfg = tiny_cfg()
    backbone = build_rev_vit_backbone(cfg, ShapeSpec(channels=3))
    with pytest.raises(ValueError, match=r"backprop = 'store' is not valid"):
        set_backprop(backbone, "store")
    with pytest.raises(ValueError, match=r"backprop = 'store' is not valid"):
        backbone.net.blocks.backprop = "store"


def test_recomputes_only_in_training_with_grad_and_a_mode_other_than_autograd():
    seq = ReversibleSequence([], backprop="reversible").train()
    assert seq.recomputes()
    with torch.no_grad():
        assert not seq.recomputes()
    assert not seq.eval().recomputes()
    seq.train().backprop = "autograd"
    assert not seq.recomputes()


def test_the_reversible_pyramid_needs_a_two_stream_trunk():
    class SingleScale(Backbone):
        def forward(self, x):
            return {"last_feat": x}

        def output_shape(self):
            return {"last_feat": ShapeSpec(channels=64, stride=16)}

    SingleScale._out_features = ["last_feat"]
    with pytest.raises(TypeError, match="not a TwoStreamTrunk.*forward_streams and fuse"):
        ReversibleFeaturePyramid(SingleScale())


def test_a_two_stream_trunk_fuses_its_streams_in_forward():
    class Halves(TwoStreamTrunk):
        def __init__(self):
            super().__init__()
            self.blocks = ReversibleSequence([], "reversible")
            self._out_features = ["last_feat"]
            self._out_feature_channels = {"last_feat": 6}
            self._out_feature_strides = {"last_feat": 1}

        def forward_streams(self, x):
            return x, -x

        def fuse(self, x1, x2):
            return torch.cat([x1, x2], dim=1)

    trunk = Halves()
    trunk.backprop = "checkpoint"  # the mode is the block sequence's
    assert trunk.blocks.backprop == "checkpoint"
    x = torch.randn(1, 3, 4, 4)
    assert trunk.stream_channels == 3
    assert torch.equal(trunk(x)["last_feat"], torch.cat([x, -x], dim=1))


def _imports(path):
    """The modules a file imports (absolute names; relative imports resolved)."""
    import ast
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.relpath(os.path.dirname(path), root).replace(os.sep, ".")
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _rev_det_imports(path):
    """The rev_det and Detectron2 modules a file imports."""
    return {n for n in _imports(path) if n.startswith("rev_det") or n.startswith("detectron2")}


@pytest.mark.parametrize("layer", ["reversible", "modeling"])
def test_layers_import_only_from_below(layer):
    """docs/architecture.md: the engine imports nothing of Detectron2 or the rest of rev_det;
    the model files (all of rev_det/modeling but the builders) import no config or training
    machinery."""
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "rev_det", layer, "*.py")))
    assert files
    for path in files:
        if os.path.basename(path) in ("backbone.py", "__init__.py") and layer == "modeling":
            continue  # the builders and the registration are Detectron2 glue
        imports = _rev_det_imports(path)
        if layer == "reversible":
            bad = {n for n in imports if not n.startswith("rev_det.reversible")}
        else:
            allowed = ("rev_det.modeling", "rev_det.reversible", "detectron2.layers")
            allowed += ("detectron2.modeling",)
            bad = {n for n in imports if not n.startswith(allowed)}
        assert not bad, f"{os.path.relpath(path, root)} imports {sorted(bad)}"


def test_only_entry_points_import_the_wiring_of_the_runs():
    """docs/architecture.md: rev_det.runs wires the rest of the Detectron2 glue into the
    entry points' runs; no other part of rev_det imports it, so the glue stays free of cycles
    and the runs are the only place where the extras are put together."""
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sorted(glob.glob(os.path.join(root, "rev_det", "**", "*.py"), recursive=True))
    assert files
    # rev_det.predict is an entry point itself (python -m rev_det.predict, tools/predict.py);
    # trainer.py is the deprecated alias of runs.py.
    entry_points = {os.path.join("rev_det", f) for f in ("runs.py", "predict.py", "trainer.py")}
    for path in files:
        if os.path.relpath(path, root) in entry_points:
            continue
        bad = {n for n in _rev_det_imports(path) if n.startswith("rev_det.runs")}
        assert not bad, f"{os.path.relpath(path, root)} imports {sorted(bad)}"


def test_the_benchmark_library_imports_no_tool_or_project():
    """docs/architecture.md: rev_det/benchmark is Detectron2 glue: it may import rev_det and
    Detectron2, never a script of tools/ or projects/ (tools/benchmark.py is its command line)."""
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    scripts = glob.glob(os.path.join(root, "tools", "*.py"))
    scripts += glob.glob(os.path.join(root, "projects", "**", "*.py"), recursive=True)
    script_names = {os.path.splitext(os.path.basename(p))[0] for p in scripts}
    files = sorted(
        glob.glob(os.path.join(root, "rev_det", "benchmark", "**", "*.py"), recursive=True)
    )
    assert files
    for path in files:
        bad = {n for n in _imports(path) if n.split(".")[0] in script_names}
        assert not bad, f"{os.path.relpath(path, root)} imports {sorted(bad)}"
        assert "sys.path" not in open(path).read(), os.path.relpath(path, root)
