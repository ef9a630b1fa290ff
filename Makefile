PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# The exact tested versions (constraints.txt).
PIP_INSTALL := $(PY) -m pip install -q -c constraints.txt

.PHONY: demo test test-unit test-slow bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# make demo: jaxvit alone (no torch, no test tools)
$(DEMO_STAMP): pyproject.toml setup.py constraints.txt | $(VENV)/bin/python
	$(PIP_INSTALL) -e .
	touch $(DEMO_STAMP)

# make test: the test extras and the PyTorch reference projects (installed without their dependencies)
$(STAMP): pyproject.toml setup.py constraints.txt | $(VENV)/bin/python
	$(PIP_INSTALL) -e ".[test]"
	$(PIP_INSTALL) --no-deps dinov2 terratorch
	touch $(STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/jaxvit train --config=gz2_lora:demo --workdir=runs/demo

test: $(STAMP)  # unit + integration
	$(PY) -m pytest tests -m "not slow"

test-unit: $(STAMP)  # the edit loop
	$(PY) -m pytest tests -m unit

test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow

bench: $(STAMP)
	$(PY) -m jaxvit.benchmark --arch=dinov2_vits14 --mode=lora

clean:
	rm -rf $(VENV) runs
