#!/usr/bin/env bash
# Multi-node pretraining under SLURM: one srun task per node, each running torchrun for that node's
# GPUs, rendezvous (c10d) on the first node of the allocation. Submit as is; arguments go to
# launch.train:
#
#   sbatch --nodes 4 launch/slurm_train.sh --config configs/runs/pretrain.yaml --model glm-4-9b \
#          --tp 8 --pp 2 --global-batch-size 512 --micro-batch-size 1 --sequence-parallel
#
# Environment (all optional): NNODES (default: SLURM_NNODES), GPUS_PER_NODE (default:
# SLURM_GPUS_ON_NODE, else 8), MASTER_ADDR (default: first host of SLURM_JOB_NODELIST),
# MASTER_PORT (29500), PYTHON (python), OMP_NUM_THREADS (8).
# Dry run: `bash launch/slurm_train.sh --print-cmd ARGS...` (or DRY_RUN=1) prints the command and exits;
# launch.train.torchrun_command builds the same torchrun part in Python.
#
#SBATCH --job-name=glm-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

dry_run="${DRY_RUN:-0}"
if [ "${1:-}" = "--print-cmd" ]; then
    dry_run=1
    shift
fi

nnodes="${NNODES:-${SLURM_NNODES:-1}}"
gpus_per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
if [ -z "${MASTER_ADDR:-}" ]; then
    if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null 2>&1; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    else
        MASTER_ADDR="$(hostname)"
    fi
fi
master_port="${MASTER_PORT:-29500}"
rdzv_id="${SLURM_JOB_ID:-glm-pretrain}"
python="${PYTHON:-python}"

cmd=(srun --nodes="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1
     "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node="$gpus_per_node"
     --rdzv-id="$rdzv_id" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$master_port"
     -m launch.train "$@")

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
exec "${cmd[@]}"
