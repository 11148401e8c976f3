#!/usr/bin/env bash
# The official VIAR recipe (d30, 256 px ImageNet, 8 GPUs), flags as in mobiushy/VIAR scripts/train.sh.
# Overrides: DATA_PATH (ImageNet root with train/ and val/), NPROC (GPUs on this node), VAE_CKPT (tokenizer),
# OUT (output folder); extra arguments are passed on to train.py (e.g. --use_implicit=False for VAR).
# Running it again in the same OUT resumes from OUT/ar-ckpt-last.pth.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_PATH=${DATA_PATH:-/path/to/imagenet}
NPROC=${NPROC:-8}
VAE_CKPT=${VAE_CKPT:-ckpts/vae_ch160v4096z32.pth}
OUT=${OUT:-local_output}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

exec "$PY" -m torch.distributed.run \
  --nnodes=1 \
  --node_rank=0 \
  --nproc_per_node="$NPROC" \
  --master_addr=127.0.0.1 \
  --master_port="${MASTER_PORT:-7777}" \
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
