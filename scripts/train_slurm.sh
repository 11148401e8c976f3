#!/usr/bin/env bash
# The official VIAR recipe on a SLURM cluster: one elastic torchrun per node, started by srun.
#
#   cd /path/to/this/repo && DATA_PATH=/data/imagenet sbatch scripts/train_slurm.sh [train.py flags ...]
#   sbatch --nodes=4 --time=2-00:00:00 scripts/train_slurm.sh --save_every_steps=500   # #SBATCH values overridden
#
# Submit from the repository root (sbatch runs a copy of this file, so its own path is no guide) or set REPO.
# Each node runs scripts/train.sh in its elastic form (c10d rendezvous on the first node of the job, rendezvous
# id = the job id), so the flags are exactly those of scripts/train.sh and arguments are passed on to train.py.
#
# Requeue: --requeue lets SLURM put a preempted job back in the queue, and 120 s before the time limit this
# script requeues the job itself (USR1, below). A requeued job keeps its SLURM_JOB_ID (SLURM_RESTART_COUNT goes
# up), so OUT (default local_output/<job name>) and the rendezvous id are the same, and train.py resumes from
# OUT/ar-ckpt-last.pth. Steps since the last save are lost: pass --save_every_steps=N to bound them.
# OUT must be on a file system every node sees. Environment (exported before sbatch, which passes it on):
#   DATA_PATH, VAE_CKPT, OUT, NPROC (default: the GPUs SLURM gave each node), MASTER_PORT (default derived from
#   the job id), MAX_RESTARTS (torchrun restarts per node, default 3), RDZV_CONF, REPO, PYTHON.
#
#SBATCH --job-name=viar-d30
#SBATCH --nodes=2                 # nodes; one torchrun per node
#SBATCH --ntasks-per-node=1       # that torchrun is the node's only task; it starts one worker per GPU
#SBATCH --gpus-per-node=8         # GPUs per node (NPROC follows it)
#SBATCH --cpus-per-task=64        # CPU cores per node, for the data-loading workers of its 8 ranks
#SBATCH --time=48:00:00           # wall-clock limit of one allocation; the job requeues itself before it
#SBATCH --requeue                 # preemption or a node failure puts the job back in the queue (same job id)
#SBATCH --signal=B:USR1@120       # USR1 to this batch shell 120 s before the time limit
#SBATCH --open-mode=append        # a requeued run appends to the same log file
#SBATCH --output=slurm-%x-%j.out  # %x job name, %j job id
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$REPO/scripts/train.sh" ]; then
  echo "no scripts/train.sh under $REPO: submit from the repository root or set REPO" >&2
  exit 2
fi
cd "$REPO"
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch}"
: "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}"

# the c10d rendezvous store runs on the first node of the allocation (no `| head`: SIGPIPE under pipefail)
HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${HOSTS%%$'\n'*}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM_JOB_NUM_NODES is not set}}
export NNODES=$NODES
export NPROC=${NPROC:-${SLURM_GPUS_ON_NODE:-8}}
export RDZV_ID=$SLURM_JOB_ID        # unchanged by a requeue
export MAX_RESTARTS=${MAX_RESTARTS:-3}
export OUT=${OUT:-local_output/${SLURM_JOB_NAME:-viar}}   # unchanged by a requeue, so the run resumes
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "[slurm] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $NNODES node(s) x $NPROC GPU(s):" \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, output $OUT"

# shellcheck disable=SC2317   # called by the trap, which shellcheck does not follow
requeue() {
  echo "[slurm] USR1: time limit near, requeueing job $SLURM_JOB_ID; it resumes from $OUT/ar-ckpt-last.pth"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

# one task per node; a torchrun that gives up (restarts used up) ends the others, and the job
SRUN=(--nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --kill-on-bad-exit=1)
# srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05)
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN+=(--cpus-per-task="$SLURM_CPUS_PER_TASK"); fi
# in the background, so that the USR1 trap runs while it trains
srun "${SRUN[@]}" bash scripts/train.sh "$@" &
pid=$!
rc=0
while :; do
  wait "$pid" && rc=0 || rc=$?
  kill -0 "$pid" 2>/dev/null || break   # a trapped signal ended the wait, not srun
done
exit "$rc"
