#!/usr/bin/env bash
# COCO Karpathy test captioning after COCO fine-tuning (paper: CIDEr 140.4 -> 141.8). (opt2.7b). Example argument: model.finetuned=/path/to/checkpoint.pth
# Arguments: key=value settings (passed as --options), or evaluate.py's own (--options ..., --debug).
# NPROC processes per node (default 8); several nodes: NNODES with NODE_RANK + MASTER_ADDR, or
# RDZV_ENDPOINT (c10d): see run_scripts/pformer/launch.sh and slurm_example.sbatch.
set -euo pipefail
export NPROC=${NPROC:-8}
exec "$(dirname "$0")/../launch.sh" evaluate.py projects/pformer/eval/caption_coco_opt2.7b.yaml "$@"
