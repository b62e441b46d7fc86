#!/usr/bin/env bash
# Zero-shot OK-VQA test, answers lemmatised (needs spacy's en_core_web_sm) (paper: 25.9 -> 30.0 with OPT-2.7B). (flant5xl). Example argument: model.finetuned=/path/to/checkpoint.pth
# Arguments: key=value settings (passed as --options), or evaluate.py's own (--options ..., --debug).
# NPROC processes per node (default 8); several nodes: NNODES with NODE_RANK + MASTER_ADDR, or
# RDZV_ENDPOINT (c10d): see run_scripts/pformer/launch.sh and slurm_example.sbatch.
set -euo pipefail
export NPROC=${NPROC:-8}
exec "$(dirname "$0")/../launch.sh" evaluate.py projects/pformer/eval/okvqa_zeroshot_flant5xl.yaml "$@"
