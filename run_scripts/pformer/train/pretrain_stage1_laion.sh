#!/usr/bin/env bash
# Training with projects/pformer/train/pretrain_stage1_laion.yaml (COCO + VG + LAION shards, iteration schedule)
# Arguments: key=value settings (passed as --options), or train.py's own (--options ..., --debug).
# NPROC processes per node (default 8); several nodes: NNODES with NODE_RANK + MASTER_ADDR, or
# RDZV_ENDPOINT (c10d): see run_scripts/pformer/launch.sh and slurm_example.sbatch.
set -euo pipefail
export NPROC=${NPROC:-8}
exec "$(dirname "$0")/../launch.sh" train.py projects/pformer/train/pretrain_stage1_laion.yaml "$@"
