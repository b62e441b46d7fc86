#!/usr/bin/env bash
# Zero-shot GQA test-dev (paper: 30.5 -> 34.0 with OPT-2.7B). (flant5xl). Arguments go to --options, e.g. model.finetuned=/path/to/checkpoint.pth
set -euo pipefail
cd "$(dirname "$0")/../../.."
NPROC=${NPROC:-8}
torchrun --nproc_per_node=$NPROC evaluate.py --cfg-path projects/pformer/eval/gqa_zeroshot_flant5xl.yaml ${1:+--options "$@"}
