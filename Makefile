# Every target sets itself up: a local virtualenv (.venv) with the verified pins, then the plugin.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY := output/tiny

.PHONY: install test demo demo-backbones tiny-chain tiny-shards ablation paper tiny gpu-check clean

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

# The shapes-world miniature of the paper's comparison (docs/demo.md), on the CPU, offline: three arms (BLIP-2
# baseline, P-Former, P-Former + QA term) through train.py / evaluate.py, stages 0, 1, 2, zero-shot VQA and
# captioning, on the committed frozen backbones. Table in output/demo/results.md.
demo: install
	$(PY) -m lavis_pformer.demo.pipeline --out output/demo

# Rebuild the demo's frozen LM, ViT and starting BERT (lavis_pformer/demo/backbones, committed) from their recipe.
demo-backbones: install
	$(PY) -m lavis_pformer.demo.frozen_backbones --out lavis_pformer/demo/backbones --work output/demo-backbones

# The tiny chain: stage 0 -> 1 -> 2 -> VQA + caption evaluation on random tiny backbones (a pipeline check).
tiny-chain: tiny
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage0_opt.yaml
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage1_opt.yaml
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage2_opt.yaml
	$(PY) evaluate.py --cfg-path projects/pformer/tiny/eval_vqa_opt.yaml
	$(PY) evaluate.py --cfg-path projects/pformer/tiny/eval_caption_opt.yaml

# The tiny stage 1 (shards mixed with local_caption) and stage 2 (shards alone) from webdataset shards of the tiny
# world, on 2 gloo ranks x 2 DataLoader workers (docs/data.md, image_text_shards).
tiny-shards: tiny
	test -f $(TINY)/shards/00000.tar || $(PY) -m lavis_pformer.datasets.to_shards \
		--captions $(TINY)/world/captions_train.json --images $(TINY)/world --out $(TINY)/shards --shard-size 8
	$(PY) train.py --cfg-path projects/pformer/tiny/pretrain_stage0_opt.yaml
	$(PY) -m torch.distributed.run --nproc_per_node 2 train.py --cfg-path projects/pformer/tiny/pretrain_stage1_shards.yaml
	$(PY) -m torch.distributed.run --nproc_per_node 2 train.py --cfg-path projects/pformer/tiny/pretrain_stage2_shards.yaml

# The paper's Table-4 grid (w1, w2) for the P-Former arms over 3 seeds, on the demo's world and backbones.
# On a GPU machine: ABLATION_ARGS="--scale gpu --shared output/ablation/shared".
ABLATION_ARGS ?= --shared output/demo
ablation: install
	$(PY) -m lavis_pformer.demo.pipeline --ablation --seeds 0,1,2 --out output/ablation $(ABLATION_ARGS)

# Every claim of the paper in miniature over 3 worlds (docs/paper.md): Tables 1, 2, 6 and the out-of-domain test
# by default; PAPER_ARGS="--tables all" adds Tables 4, 5 and 7, "--reuse" keeps runs finished before an interruption.
PAPER_ARGS ?=
paper: install
	$(PY) -m lavis_pformer.demo.paper --out output/paper $(PAPER_ARGS)

# The first GPU run in one command (docs/cluster.md): environment, the tiny chain under torchrun + nccl + amp with a
# resume, the paper-size training steps (fp16 + GradScaler, bf16) next to stock LAVIS, the inference and VQ
# benchmarks; each part under its own time limit, about 8 minutes on one H200. Results: $(GPU_CHECK_OUT)/gpu_check.md
# and .json. On a CPU: `$(PY) bench/gpu_check.py --dry-run --out /tmp/gpu-check` checks the script itself.
GPU_CHECK_OUT ?= output/gpu-check
gpu-check: install
	$(PY) bench/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf output
