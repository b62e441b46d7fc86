#!/usr/bin/env bash
# Zero-shot OK-VQA test, answers lemmatised (needs spacy's en_core_web_sm) (paper: 25.9 -> 30.0 with OPT-2.7B). (flant5xl). Arguments go to --options, e.g. model.finetuned=/path/to/checkpoint.pth
set -euo pipefail
cd "$(dirname "$0")/../../.."
NPROC=${NPROC:-8}
torchrun --nproc_per_node=$NPROC evaluate.py --cfg-path projects/pformer/eval/okvqa_zeroshot_flant5xl.yaml ${1:+--options "$@"}
