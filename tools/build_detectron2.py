#!/usr/bin/env python
"""Build Detectron2 v0.6 as a pure-Python wheel from the package index's source distribution.

Detectron2 publishes no wheels. The package index carries ``pb1-detectron2==0.6``, a source
distribution whose Python files are those of the official v0.6 release but which lacks the C++
sources. This script turns it into a wheel named ``detectron2``:

* no compiled extension: ``detectron2._C`` is a placeholder whose op lookups raise an
  ImportError that names the op (deformable conv, rotated boxes and the fast COCO evaluator need
  a Detectron2 built from source; Mask R-CNN with rev_det's backbones needs none of them);
* ``detectron2/model_zoo/configs/**`` is installed, so ``model_zoo.get_config_file`` and
  ``model_zoo.get_config("common/...")`` work;
* ``detectron2.projects.point_rend`` / ``deeplab`` / ``panoptic_deeplab`` are installed as in
  the official wheel;
* dependencies that v0.6 needs on a current Python are pinned: ``setuptools<81``
  (``pkg_resources``) and ``pillow<10`` (``Image.LINEAR``); numpy aliases removed in numpy 1.24
  (``np.bool``, ``np.int``, ...) are rewritten to the builtins they always meant.

The wheel is cached (``--cache-dir``), so a second set-up installs it without rebuilding.
Usage: ``python tools/build_detectron2.py [--cache-dir DIR]``; prints the wheel's path.
"""

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
DEFAULT_INDEX = "https://pypi.org/simple"
WHEEL_VERSION = "0.6+revdet.purepy2"

# What v0.6 declares, minus the pins that no longer install (black==21.4b2 breaks with click>=8.1)
# plus the two pins it needs on current Python.
REQUIREMENTS = [
    "Pillow>=7.1,<10",
    "setuptools<81",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]

PROJECTS = {
    "detectron2.projects.point_rend": "projects/PointRend/point_rend",
    "detectron2.projects.deeplab": "projects/DeepLab/deeplab",
    "detectron2.projects.panoptic_deeplab": "projects/Panoptic-DeepLab/panoptic_deeplab",
}

PLACEHOLDER_C = '''\
"""Placeholder for Detectron2's compiled ops (this Detectron2 was built without them).

The environment report (``detectron2.utils.collect_env``) can still query the build; every op
lookup raises an ImportError that names the op.
"""


def get_compiler_version():
    return "none (pure-Python build, no compiled ops)"


def get_cuda_version():
    return "none (pure-Python build, no compiled ops)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(
        f"detectron2._C.{name} is a compiled op, and this Detectron2 is a pure-Python build "
        "without them (deformable conv, rotated boxes and the fast COCO evaluator need them). "
        "Install a Detectron2 built from source with its C++ ops to use it."
    )
'''

SETUP_PY = """\
from setuptools import find_packages, setup

PROJECTS = {projects!r}
setup(
    name="detectron2",
    version={version!r},
    description="Detectron2 v0.6 (pure-Python build, no compiled ops)",
    url="https://github.com/facebookresearch/detectron2",
    packages=find_packages(include=["detectron2", "detectron2.*"]) + list(PROJECTS),
    package_dir=PROJECTS,
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.7",
    install_requires={requirements!r},
)
"""

# v0.6's detectron2/export/__init__.py imports the Caffe2 exporter unconditionally, and Caffe2
# left PyTorch in 2.0, so `detectron2.export` (TracingAdapter) and `detectron2.utils.analysis`
# (FlopCountAnalysis) would not import. As in Detectron2 main, the Caffe2 API is optional.
EXPORT_INIT = """\
# -*- coding: utf-8 -*-
# Rewritten by rev_det's tools/build_detectron2.py: the Caffe2 exporter is optional, as in
# Detectron2 main, because PyTorch >= 2.0 ships no caffe2.
from .flatten import TracingAdapter
from .torchscript import dump_torchscript_IR, scripting_with_instances

try:
    from caffe2.proto import caffe2_pb2 as _caffe2_pb2  # noqa: F401
except ImportError:
    pass
else:
    from .api import *  # noqa: F401,F403

__all__ = [k for k in globals().keys() if not k.startswith("_")]
"""

# np.bool, np.int, np.float, np.str and np.object were deprecated aliases of the builtins.
REMOVED_NUMPY_ALIASES = re.compile(r"\bnp\.(bool|int|float|str|object)\b(?!_)")


def index_url():
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_sdist(cache_dir: Path) -> Path:
    """Download the sdist from the index's simple API (once) and verify its checksum."""
    target = cache_dir / SDIST_NAME
    if target.exists() and sha256(target) == SDIST_SHA256:
        return target
    page_url = f"{index_url()}/pb1-detectron2/"
    page = urllib.request.urlopen(page_url, timeout=60).read().decode()
    match = re.search(r'href="([^"]*' + re.escape(SDIST_NAME) + r'[^"]*)"', page)
    if match is None:
        sys.exit(f"{SDIST_NAME} is not listed at {page_url}; cannot build Detectron2.")
    url = urllib.parse.urljoin(page_url, match.group(1).replace("&amp;", "&"))
    partial = target.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=120) as response, open(partial, "wb") as f:
        shutil.copyfileobj(response, f)
    if sha256(partial) != SDIST_SHA256:
        partial.unlink()
        sys.exit(f"checksum mismatch for {url}; refusing to build from it.")
    partial.rename(target)
    return target


def prepare_source(sdist: Path, workdir: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(workdir, filter="data")
    src = workdir / "pb1-detectron2-0.6"
    shutil.rmtree(src / "pb1_detectron2.egg-info")
    for py in list((src / "detectron2").rglob("*.py")) + list((src / "projects").rglob("*.py")):
        text = py.read_text()
        fixed = REMOVED_NUMPY_ALIASES.sub(r"\1", text)
        if fixed != text:
            py.write_text(fixed)
    (src / "detectron2" / "_C.py").write_text(PLACEHOLDER_C)
    (src / "detectron2" / "export" / "__init__.py").write_text(EXPORT_INIT)
    (src / "setup.py").write_text(
        SETUP_PY.format(projects=PROJECTS, version=WHEEL_VERSION, requirements=REQUIREMENTS)
    )
    (src / "setup.cfg").unlink()
    return src


def build_wheel(cache_dir: Path) -> Path:
    wheel_name = f"detectron2-{WHEEL_VERSION}-py3-none-any.whl"
    wheel = cache_dir / wheel_name
    if wheel.exists():
        return wheel
    sdist = fetch_sdist(cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        src = prepare_source(sdist, Path(tmp))
        out = Path(tmp) / "dist"
        subprocess.check_call(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
            + ["-w", str(out), str(src)]
        )
        (built,) = out.glob("detectron2-*.whl")
        shutil.move(str(built), wheel)
    return wheel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rev_det"
    parser.add_argument("--cache-dir", type=Path, default=default_cache)
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(build_wheel(args.cache_dir))


if __name__ == "__main__":
    main()
