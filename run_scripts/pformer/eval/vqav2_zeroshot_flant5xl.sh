#!/usr/bin/env bash
# Zero-shot VQAv2 val (paper Table 2; OPT-2.7B 4M: BLIP-2 46.8 -> P-Former 52.6). (flant5xl). Arguments go to --options, e.g. model.finetuned=/path/to/checkpoint.pth
set -euo pipefail
cd "$(dirname "$0")/../../.."
NPROC=${NPROC:-8}
torchrun --nproc_per_node=$NPROC evaluate.py --cfg-path projects/pformer/eval/vqav2_zeroshot_flant5xl.yaml ${1:+--options "$@"}
