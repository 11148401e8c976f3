#!/usr/bin/env bash
# The official VIAR recipe (d30, 256 px ImageNet, 8 GPUs), flags as in mobiushy/VIAR scripts/train.sh.
# Overrides: DATA_PATH (ImageNet root with train/ and val/), NPROC (GPUs on this node), VAE_CKPT (tokenizer),
# OUT (output folder); extra arguments are passed on to train.py (e.g. --use_implicit=False for VAR).
# Running it again in the same OUT resumes from OUT/ar-ckpt-last.pth.
#
# One node (the default):
#   DATA_PATH=/data/imagenet bash scripts/train.sh
# Several nodes, static ranks: run on every node, NODE_RANK 0..NNODES-1, MASTER_ADDR = node 0's address:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=7777 bash scripts/train.sh    # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 MASTER_PORT=7777 bash scripts/train.sh    # on node1
# Several nodes, elastic (c10d rendezvous; set RDZV_ID, or RDZV=1): run the same line on every node. Ranks are
# assigned at each rendezvous; a node that dies and is started again rejoins, and all nodes restart from
# OUT/ar-ckpt-last.pth (at most MAX_RESTARTS, default 3, restarts per node). NNODES may be a MIN:MAX range.
#   NNODES=2 RDZV_ID=myrun MASTER_ADDR=node0 MASTER_PORT=7777 bash scripts/train.sh  # on node0 and node1
# MASTER_ADDR:MASTER_PORT is then the rendezvous store, hosted by the node whose address it is (start that
# one first). RDZV_CONF is passed on as --rdzv-conf (e.g. join_timeout=900). Elastic mode exports
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (restarts across nodes hang otherwise; see dist.py).
# With several nodes, OUT must be one shared folder (every rank reads OUT/ar-ckpt-last.pth to resume).
# On SLURM: scripts/train_slurm.sh (which calls this script). Docs: docs/TRAINING.md, "Multi-node and SLURM".
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_PATH=${DATA_PATH:-/path/to/imagenet}
NPROC=${NPROC:-8}
VAE_CKPT=${VAE_CKPT:-ckpts/vae_ch160v4096z32.pth}
OUT=${OUT:-local_output}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-7777}

if [ -n "${RDZV_ID:-}" ] || [ "${RDZV:-0}" = 1 ]; then
  # elastic: every node runs the same command; the rendezvous assigns node ranks
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  LAUNCH=(--nnodes="$NNODES"
          --rdzv-backend=c10d
          --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"
          --rdzv-id="${RDZV_ID:-viar}"
          --max-restarts="${MAX_RESTARTS:-3}")
  if [ -n "${RDZV_CONF:-}" ]; then LAUNCH+=(--rdzv-conf="$RDZV_CONF"); fi
else
  case "$NNODES" in *:*)
    echo "NNODES=$NNODES: a MIN:MAX range needs the elastic form (set RDZV_ID or RDZV=1)" >&2; exit 2;;
  esac
  LAUNCH=(--nnodes="$NNODES"
          --node_rank="$NODE_RANK"
          --master_addr="$MASTER_ADDR"
          --master_port="$MASTER_PORT")
fi

exec "$PY" -m torch.distributed.run \
  "${LAUNCH[@]}" \
  --nproc_per_node="$NPROC" \
  train.py \
  --data_path="$DATA_PATH" \
  --depth=30 \
  --bs=512 \
  --ep=550 \
  --tblr=8e-5 \
  --fp16=1 \
  --alng=1e-5 \
  --wpe=0.01 \
  --twde=0.08 \
  --use_implicit=True \
  --p_depth=5 \
  --vae_ckpt="$VAE_CKPT" \
  --local_out_dir_path="$OUT" \
  "$@"
