#!/usr/bin/env bash
# The official VIAR evaluation: sample 50,000 images (50 per class) with the paper's settings
# (cfg 1.5, Con.(10,10) iterations, top-k 900, top-p 0.96, seed 1), then ADM's metrics.
#
#   bash scripts/eval.sh                      # ckpts/viar.pth, ckpts/vae_ch160v4096z32.pth
#   CKPT=ckpts/other.pth bash scripts/eval.sh --inception_pb /path/classify_image_graph_def.pb
#   LAUNCH="torchrun --nproc_per_node=8" bash scripts/eval.sh      # sample on 8 GPUs
#   RESO=512 bash scripts/eval.sh             # 512 px: ckpts/var_d36.pth (VAR-d36-s) against ADM's 512 batch
#
# Extra arguments go to evaluator.py. Sampling resumes where it stopped if interrupted.
# RESO=512 uses ADM's 512x512 reference batch VIRTUAL_imagenet512.npz (no labels in its name, unlike the 256 one)
# and samples the checkpoint with the architecture read from the file (depth 36, shared AdaLN, pyramid 1..32);
# a 512 px VIAR checkpoint works the same way (CKPT=..., its iteration flags as below).
set -euo pipefail
cd "$(dirname "$0")/.."

RESO=${RESO:-256}
case "$RESO" in
  256) REF_URL=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz
       REF=data/VIRTUAL_imagenet256_labeled.npz
       CKPT=${CKPT:-ckpts/viar.pth}
       MODEL=(--depth 30 --use_implicit True --pre_depth 5 --post_depth 5 --iter_left 10 --iter_right 10) ;;
  512) REF_URL=https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/512/VIRTUAL_imagenet512.npz
       REF=data/VIRTUAL_imagenet512.npz
       CKPT=${CKPT:-ckpts/var_d36.pth}
       MODEL=() ;;   # the file sets depth 36, shared AdaLN and the 512 px pyramid
  *) echo "error: RESO must be 256 or 512, got $RESO" >&2; exit 1 ;;
esac
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
  echo "error: reference batch $REF is missing; download the ADM ImageNet ${RESO}x${RESO} reference batch:" >&2
  echo "  mkdir -p data && wget -O $REF $REF_URL" >&2
  exit 1
fi
for f in "$CKPT" "$VAE"; do
  if [ ! -f "$f" ]; then
    echo "error: checkpoint $f is missing; download it from the Hugging Face repos mobiushy/VIAR (viar.pth)" \
         "and FoundationVision/var (vae_ch160v4096z32.pth, var_d36.pth), or set CKPT= / VAE=" >&2
    exit 1
  fi
done

$LAUNCH sampling.py \
  --ckpt_path "$CKPT" \
  --vae_ckpt "$VAE" \
  --cfg $CFG \
  "${MODEL[@]}" \
  --sample_dir samples \
  --top_k 900 \
  --top_p 0.96 \
  --seed $SEED

# the official folder name: <implicit | d<depth>>-<checkpoint>-cfg-<cfg>-seed-<seed>
NPZ=$(ls -t samples/*-"$(basename "$CKPT")"-cfg-$CFG-seed-$SEED.npz | head -n 1)
SAMPLES=${NPZ%.npz}
"$PY" evaluator.py "$REF" "$SAMPLES.npz" --json "$SAMPLES.metrics.json" "$@"
