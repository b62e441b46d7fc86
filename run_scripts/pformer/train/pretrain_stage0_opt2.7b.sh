#!/usr/bin/env bash
# Stage 0 P-Former pre-training for opt2.7b (paper: 3 GPUs x 128).
# Arguments: key=value settings (passed as --options), or train.py's own (--options ..., --debug).
# NPROC processes per node (default 3); several nodes: NNODES with NODE_RANK + MASTER_ADDR, or
# RDZV_ENDPOINT (c10d): see run_scripts/pformer/launch.sh and slurm_example.sbatch.
set -euo pipefail
export NPROC=${NPROC:-3}
exec "$(dirname "$0")/../launch.sh" train.py projects/pformer/train/pretrain_stage0_opt2.7b.yaml "$@"
