#!/usr/bin/env bash
# COCO Karpathy test captioning after COCO fine-tuning (paper: CIDEr 140.4 -> 141.8). (opt2.7b). Arguments go to --options, e.g. model.finetuned=/path/to/checkpoint.pth
set -euo pipefail
cd "$(dirname "$0")/../../.."
NPROC=${NPROC:-8}
torchrun --nproc_per_node=$NPROC evaluate.py --cfg-path projects/pformer/eval/caption_coco_opt2.7b.yaml ${1:+--options "$@"}
