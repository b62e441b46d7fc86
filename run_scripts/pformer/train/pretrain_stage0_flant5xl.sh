#!/usr/bin/env bash
# Stage 0 P-Former pre-training for flant5xl on one node (paper: 3 GPUs x 128). Extra args go to --options.
set -euo pipefail
cd "$(dirname "$0")/../../.."
NPROC=${NPROC:-3}
torchrun --nproc_per_node=$NPROC train.py --cfg-path projects/pformer/train/pretrain_stage0_flant5xl.yaml ${1:+--options "$@"}
