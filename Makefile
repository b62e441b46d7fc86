# Every target sets itself up: a local virtualenv (.venv) with the verified pins, then the plugin.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := output/tiny

.PHONY: install test demo tiny clean

install: $(STAMP)

$(STAMP): setup.py requirements-verified.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-verified.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import lavis_pformer"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

tiny: install
	$(PY) -m lavis_pformer.tiny --out $(TINY)

demo: tiny
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage0_opt.yaml

clean:
	rm -rf output
