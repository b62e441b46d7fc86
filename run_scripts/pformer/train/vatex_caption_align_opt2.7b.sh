#!/usr/bin/env bash
# projects/pformer/train/vatex_caption_align_opt2.7b.yaml on 8 GPUs; extra arguments go to train.py (e.g. --options key=value ...).
set -euo pipefail
cd "$(dirname "$0")/../../.."
torchrun --nproc_per_node=8 train.py --cfg-path projects/pformer/train/vatex_caption_align_opt2.7b.yaml "$@"
