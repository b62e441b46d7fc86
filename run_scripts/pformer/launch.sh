#!/usr/bin/env bash
# torchrun for train.py / evaluate.py, on one node or several; every script of run_scripts/pformer calls it:
#
#   run_scripts/pformer/launch.sh train.py projects/pformer/train/pretrain_stage1.yaml [arguments]
#
# Arguments after the config: key=value settings (passed as --options key=value ...), or train.py's own
# arguments when the first one starts with "--" (--options ..., --debug).
#
# Environment (all optional):
#   NPROC          processes per node (default 8; one per GPU)
#   NNODES         number of nodes (default 1); run the same command on every node
#   NODE_RANK      this node's rank, 0 .. NNODES-1 (default 0)       } static rendezvous: node 0 hosts it
#   MASTER_ADDR    address of node 0 (default 127.0.0.1 on one node)  }
#   MASTER_PORT    a free port on node 0 (default 29500)              }
#   RDZV_ENDPOINT  host:port of a c10d rendezvous, instead of the three above: nodes get their ranks when they
#                  join, so every node runs exactly the same command (what SLURM's srun does)
#   RDZV_ID        the run's id, the same on every node (default pformer; slurm_example.sbatch uses the job id)
#   TORCHRUN       the launcher (default torchrun; e.g. "python -m torch.distributed.run")
#
# One output folder for the whole run: rank 0 chooses the job id and writes the checkpoints, so run.output_dir
# must be a folder every node sees (a shared file system) for the checkpoints and logs to be in one place.
set -euo pipefail
usage() { echo "launch.sh: $*" >&2; exit 2; }
[[ $# -ge 2 ]] || usage "usage: launch.sh train.py|evaluate.py <config.yaml> [key=value ... | train.py arguments]"
entry=$1 cfg=$2
shift 2
[[ $entry == train.py || $entry == evaluate.py ]] || usage "the first argument is train.py or evaluate.py, not '$entry'"
cd "$(dirname "$0")/../.."
[[ -f $cfg ]] || usage "no config file $cfg (paths are relative to $(pwd))"

NPROC=${NPROC:-8}
NNODES=${NNODES:-1}
for name in NPROC NNODES; do
  [[ ${!name} =~ ^[1-9][0-9]*$ ]] || usage "$name must be a positive integer, got '${!name}'"
done
launcher=(${TORCHRUN:-torchrun})
args=(--nnodes="$NNODES" --nproc_per_node="$NPROC")
if [[ -n ${RDZV_ENDPOINT:-} ]]; then
  [[ $RDZV_ENDPOINT == *:* ]] || usage "RDZV_ENDPOINT must be host:port, got '$RDZV_ENDPOINT'"
  args+=(--rdzv_backend=c10d --rdzv_endpoint="$RDZV_ENDPOINT" --rdzv_id="${RDZV_ID:-pformer}")
else
  NODE_RANK=${NODE_RANK:-0}
  [[ $NODE_RANK =~ ^[0-9]+$ && $NODE_RANK -lt $NNODES ]] || usage "NODE_RANK must be 0 .. $((NNODES - 1)), got '$NODE_RANK'"
  if [[ $NNODES -gt 1 && -z ${MASTER_ADDR:-} ]]; then
    usage "NNODES=$NNODES: set MASTER_ADDR (the address of node 0) with NODE_RANK on every node, or RDZV_ENDPOINT=host:port"
  fi
  args+=(--node_rank="$NODE_RANK" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}")
fi
extra=()
if [[ $# -gt 0 ]]; then
  if [[ $1 == --* ]]; then extra=("$@"); else extra=(--options "$@"); fi
fi
exec "${launcher[@]}" "${args[@]}" "$entry" --cfg-path "$cfg" "${extra[@]}"
