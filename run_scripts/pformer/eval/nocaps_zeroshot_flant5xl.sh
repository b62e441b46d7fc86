#!/usr/bin/env bash
# NoCaps val, zero-shot after COCO caption fine-tuning (paper: CIDEr 111.9 -> 115.1 overall). (flant5xl). Arguments go to --options, e.g. model.finetuned=/path/to/checkpoint.pth
set -euo pipefail
cd "$(dirname "$0")/../../.."
NPROC=${NPROC:-8}
torchrun --nproc_per_node=$NPROC evaluate.py --cfg-path projects/pformer/eval/nocaps_zeroshot_flant5xl.yaml ${1:+--options "$@"}
