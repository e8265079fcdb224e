"""The renamed modules: rev_det.trainer is rev_det.runs, rev_det.pretrain is rev_det.demo.pretrain
and rev_det.data.shapes is rev_det.demo.shapes. The old names still import, with a
DeprecationWarning that names the new module, and give the new modules' objects; nothing of
rev_det imports them, so ``import rev_det`` and the new names warn about nothing."""

import ast
import glob
import importlib
import os
import subprocess
import sys

import pytest
from helpers import ROOT

RENAMED = {
    "rev_det.trainer": (
        "rev_det.runs",
        [
            "Trainer",
            "load_yacs_config",
            "load_lazy_config",
            "run_lazy",
            "train_lazy",
            "load_weights",
        ],
    ),
    "rev_det.pretrain": (
        "rev_det.demo.pretrain",
        ["pretrain", "PretrainSchedule", "ShapesSegmentation", "detector_trunk", "IGNORE"],
    ),
    "rev_det.data.shapes": (
        "rev_det.demo.shapes",
        ["ensure_shapes_dataset", "draw_shapes_sample", "SHAPES_CATEGORIES", "_cache_problem"],
    ),
}


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_name_warns_and_gives_the_new_modules_objects(old, monkeypatch):
    new, names = RENAMED[old]
    new_module = importlib.import_module(new)
    # Import the old module anew, so that its warning is raised inside pytest.warns.
    # Both are put back as they were after the test.
    parent, _, child = old.rpartition(".")
    monkeypatch.delitem(sys.modules, old, raising=False)
    monkeypatch.setattr(sys.modules[parent], child, None, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"{old} is renamed {new}; import from {new}"):
        old_module = importlib.import_module(old)
    for name in names + list(new_module.__all__):
        assert getattr(old_module, name) is getattr(new_module, name), name
    # Names the alias does not list are looked up in the new module.
    assert old_module.logger is new_module.logger


def test_rev_det_and_the_new_names_warn_about_nothing():
    code = (
        "import warnings\n"
        "warnings.filterwarnings('error', category=DeprecationWarning, module='rev_det')\n"
        "warnings.filterwarnings('error', category=DeprecationWarning, module='__main__')\n"
        "import rev_det, rev_det.runs, rev_det.training, rev_det.demo\n"
        "import rev_det.demo.pretrain, rev_det.demo.shapes, rev_det.data, rev_det.predict\n"
        "from rev_det.data import SHAPES_CATEGORIES, draw_shapes_sample, ensure_shapes_dataset\n"
        "import sys\n"
        "old = {'rev_det.trainer', 'rev_det.pretrain', 'rev_det.data.shapes'} & set(sys.modules)\n"
        "assert not old, old\n"
    )
    # The warnings of the old modules are attributed to their importer (stacklevel=2): the
    # filters above turn one raised at an import by rev_det or by this script into an error.
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_nothing_imports_the_old_names():
    """The library, its tools, projects, configs and tests use the new names (but the aliases
    themselves and this file)."""
    old = tuple(RENAMED)
    aliases = {os.path.join(ROOT, *m.split(".")) + ".py" for m in old}
    files = []
    for folder in ("rev_det", "tools", "projects", "configs", "tests"):
        files += glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    assert files
    for path in sorted(set(files) - aliases - {os.path.abspath(__file__)}):
        package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([module] if module else []))
                imported = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                imported = [alias.name for alias in node.names]
            else:
                continue
            bad = [n for n in imported if n in old or n.startswith(tuple(o + "." for o in old))]
            assert not bad, f"{os.path.relpath(path, ROOT)} imports {bad}"
