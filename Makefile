# The two commands of the README: `make demo` and `make test`. Both set up on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

DEMO_CONFIG := configs/demo/mask_rcnn_rev_vit_demo.yaml
# Config overrides for both demo steps, e.g. a shorter run on a slow or shared machine:
#   make demo DEMO_OPTS='SOLVER.MAX_ITER 320 SOLVER.STEPS "(256,298)"'
DEMO_OPTS ?=

.PHONY: setup test demo format gpu-check

setup: $(STAMP)

$(STAMP): setup.py tools/setup_env.sh tools/build_detectron2.py
	PYTHON=$(PYTHON) bash tools/setup_env.sh $(VENV)
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests

# Fine-tune the demo on CPU from its shipped pretrained trunk (MODEL.WEIGHTS), evaluate it
# (COCO tables), then draw its pictures and measure its memory per backprop mode; everything
# lands in output/demo/.
demo: $(STAMP)
	$(PY) projects/train_net.py --config-file $(DEMO_CONFIG) $(DEMO_OPTS)
	$(PY) tools/demo_report.py --config-file $(DEMO_CONFIG) $(DEMO_OPTS)

# On a machine with a CUDA device: tests/test_gpu.py and the CUDA benchmark (about 8 minutes),
# results in benchmarks/gpu_check/ (docs/gpu.md).
gpu-check: $(STAMP)
	PYTHON=$(PY) bash tools/gpu_check.sh

format: $(STAMP)
	$(PY) -m isort --profile black -l 100 rev_det tests tools projects configs
	$(PY) -m black -l 100 rev_det tests tools projects configs
