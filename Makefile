PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps dinov2==0.0.1.dev2
	$(PY) -m pip install -q --no-deps terratorch==1.2.13
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m jaxvit.main --config=configs/gz2_lora.py:demo --workdir=runs/demo

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
