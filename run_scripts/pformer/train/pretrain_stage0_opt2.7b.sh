#!/usr/bin/env bash
# Stage 0 P-Former pre-training for opt2.7b on one node (paper: 3 GPUs x 128). Extra args go to --options.
set -euo pipefail
cd "$(dirname "$0")/../../.."
NPROC=${NPROC:-3}
torchrun --nproc_per_node=$NPROC train.py --cfg-path projects/pformer/train/pretrain_stage0_opt2.7b.yaml ${1:+--options "$@"}
