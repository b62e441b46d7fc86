# Every target sets itself up: a local virtualenv (.venv) with the verified pins, then the plugin.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := output/tiny

.PHONY: install test demo demo-shapes ablation tiny clean

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

# The whole recipe on tiny backbones, one CPU process: stage 0 -> 1 -> 2 -> offline VQA + caption evaluation.
demo: tiny
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage0_opt.yaml
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage1_opt.yaml
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage2_opt.yaml
	$(PY) evaluate.py --cfg-path projects/pformer/tiny/eval_vqa_opt.yaml
	$(PY) evaluate.py --cfg-path projects/pformer/tiny/eval_caption_opt.yaml

# Work in progress (docs/demo.md): the shapes-world miniature of the paper's comparison, three arms
# (BLIP-2 baseline, P-Former, P-Former + QA term) on a small LM trained first. Not yet within 15 minutes.
demo-shapes: install
	$(PY) -m lavis_pformer.demo.pipeline --out output/demo

# The paper's Table-4 grid (w1, w2) for the P-Former arms over 3 seeds (add --scale gpu on a GPU machine).
ablation: install
	$(PY) -m lavis_pformer.demo.pipeline --ablation --seeds 0,1,2 --out output/ablation

clean:
	rm -rf output
