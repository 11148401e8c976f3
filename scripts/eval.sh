#!/usr/bin/env bash
# The official VIAR evaluation: sample 50,000 images (50 per class) with the paper's settings
# (cfg 1.5, Con.(10,10) iterations, top-k 900, top-p 0.96, seed 1), then ADM's metrics.
#
#   bash scripts/eval.sh                      # ckpts/viar.pth, ckpts/vae_ch160v4096z32.pth
#   CKPT=ckpts/other.pth bash scripts/eval.sh --inception_pb /path/classify_image_graph_def.pb
#   LAUNCH="torchrun --nproc_per_node=8" bash scripts/eval.sh      # sample on 8 GPUs
#
# Extra arguments go to evaluator.py. Sampling resumes where it stopped if interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."

REF_URL=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
REF=data/VIRTUAL_imagenet256_labeled.npz
CKPT=${CKPT:-ckpts/viar.pth}
VAE=${VAE:-ckpts/vae_ch160v4096z32.pth}
PY=.venv/bin/python
LAUNCH=${LAUNCH:-$PY}
CFG=1.5
SEED=1

if [ ! -x "$PY" ]; then
  echo "error: $PY not found; run 'bash scripts/setup.sh' first" >&2
  exit 1
fi
if [ ! -f "$REF" ]; then
  echo "error: reference batch $REF is missing; download the ADM ImageNet 256x256 reference batch:" >&2
  echo "  mkdir -p data && wget -O $REF $REF_URL" >&2
  exit 1
fi
for f in "$CKPT" "$VAE"; do
  if [ ! -f "$f" ]; then
    echo "error: checkpoint $f is missing; download it from the Hugging Face repos mobiushy/VIAR (viar.pth)" \
         "and FoundationVision/var (vae_ch160v4096z32.pth), or set CKPT= / VAE=" >&2
    exit 1
  fi
done

$LAUNCH sampling.py \
  --ckpt_path "$CKPT" \
  --vae_ckpt "$VAE" \
  --cfg $CFG \
  --depth 30 \
  --use_implicit True \
  --pre_depth 5 \
  --post_depth 5 \
  --sample_dir samples \
  --iter_left 10 \
  --iter_right 10 \
  --top_k 900 \
  --top_p 0.96 \
  --seed $SEED

SAMPLES=samples/implicit-$(basename "$CKPT")-cfg-$CFG-seed-$SEED
"$PY" evaluator.py "$REF" "$SAMPLES.npz" --json "$SAMPLES.metrics.json" "$@"
