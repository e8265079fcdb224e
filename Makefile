# The two commands of the README: `make demo` and `make test`. Both set up on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup test demo format

setup: $(STAMP)

$(STAMP): setup.py tools/setup_env.sh tools/build_detectron2.py
	PYTHON=$(PYTHON) bash tools/setup_env.sh $(VENV)
	touch $@

test: $(STAMP)
	$(PY) -m pytest tests

format: $(STAMP)
	$(PY) -m isort --profile black -l 100 rev_det tests tools projects configs
	$(PY) -m black -l 100 rev_det tests tools projects configs
