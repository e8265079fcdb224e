#!/usr/bin/env bash
# Create (or reuse) a virtual environment with Detectron2 main built from source (with its CPU
# ops), the same torch as `make setup`, and rev_det installed editable with its test extras.
# Usage: tools/setup_d2main.sh [VENV_DIR] (default .venv-d2main)
# Environment: D2MAIN_TARBALL (default ../shared/vendor/detectron2-02b5c4e.tar.gz), PYTHON,
# TORCH_SPEC. Idempotent: the build is keyed on the tarball's sha256 and the rev_det install on
# setup.py's, so a second run rebuilds nothing.
set -euo pipefail
venv=${1:-.venv-d2main}
tarball=${D2MAIN_TARBALL:-../shared/vendor/detectron2-02b5c4e.tar.gz}
python=${PYTHON:-python3.11}
torch_spec=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -f "$tarball" ]; then
    echo "error: Detectron2 main tarball $tarball not found; set D2MAIN_TARBALL to its path" >&2
    exit 1
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

build_stamp="$venv/.d2main-sha256"
tarball_sha=$(sha256sum "$tarball" | cut -d' ' -f1)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$tarball_sha" ]; then
    if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
        echo "installing $torch_spec"
        # shellcheck disable=SC2086
        pip install $torch_spec
    fi
    # Main's model_zoo (hence every LazyConfig) imports pkg_resources, gone from setuptools 81;
    # ninja lets torch's extension builder compile the CPU ops in parallel; main's ViT (ViTDet,
    # which tools/benchmark.py times beside rev_det) imports timm.
    pip install "setuptools<81" wheel ninja timm
    src="$venv/src"
    rm -rf "$src"
    mkdir -p "$src"
    tar xzf "$tarball" -C "$src"
    tree=$(find "$src" -mindepth 1 -maxdepth 1 -type d)
    echo "building Detectron2 main from $tarball (CPU ops; several minutes, cached afterwards)"
    # The editable install keeps the unpacked tree: its tools/ and projects/ are used as they are.
    # --use-pep517: otherwise pip runs `setup.py develop`, which setuptools 80 hands to a pip
    # with build isolation, where torch (needed to compile the ops) is not importable.
    PATH="$(cd "$venv/bin" && pwd):$PATH" MAX_JOBS=${MAX_JOBS:-$(nproc)} \
        pip install --no-build-isolation --use-pep517 -e "$tree"
    echo "$tarball_sha" >"$build_stamp"
fi

install_stamp="$venv/.revdet-sha256"
setup_sha=$(sha256sum setup.py | cut -d' ' -f1)
if [ "$(cat "$install_stamp" 2>/dev/null)" != "$setup_sha" ]; then
    # setuptools is pinned again so that no dependency resolution lifts it past 80.
    pip install -e ".[dev,test]" "setuptools<81"
    echo "$setup_sha" >"$install_stamp"
fi
"$py" -c "import rev_det, detectron2, torch; print('rev_det ready: torch', torch.__version__, \
'detectron2', detectron2.__version__, 'from', detectron2.__path__[0])"
