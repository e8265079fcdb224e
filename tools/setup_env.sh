#!/usr/bin/env bash
# Create (or reuse) a virtual environment with torch, Detectron2 and rev_det installed.
# Usage: tools/setup_env.sh VENV_DIR. Idempotent: what is already installed is kept.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3.11}
torch_spec=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

if ! "$py" -c "import torch, torchvision" 2>/dev/null; then
    echo "installing $torch_spec"
    # shellcheck disable=SC2086
    pip install $torch_spec
fi

# An importable Detectron2 >= 0.6 whose exporter imports is used as it is; otherwise build the
# v0.6 release (an earlier rev_det build of it, whose detectron2.export needs Caffe2, is replaced).
if ! "$py" -c "import detectron2, detectron2.export, sys; v = detectron2.__version__.split('+')[0]; \
sys.exit(tuple(map(int, v.split('.')[:2])) < (0, 6))" 2>/dev/null; then
    echo "building Detectron2 v0.6 (pure Python; cached after the first build)"
    wheel=$("$py" tools/build_detectron2.py)
    pip install --force-reinstall --no-deps "$wheel"
    pip install "$wheel"  # its dependencies
fi

pip install -e ".[dev,test]"
"$py" -c "import rev_det, detectron2, torch; print('rev_det ready: torch', torch.__version__, \
'detectron2', detectron2.__version__)"
