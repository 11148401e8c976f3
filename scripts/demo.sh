#!/usr/bin/env bash
# End-to-end demo on a CPU: real data (sklearn's handwritten digits), a tokenizer trained from scratch,
# VIAR and VAR trained on its tokens, samples, and scores. See docs/DEMO.md.
#
#   bash scripts/demo.sh                  # full demo into demo_output/ (minutes on 2 CPU cores)
#   DEMO_QUICK=1 DEMO_OUT=/tmp/d bash scripts/demo.sh   # a few steps of everything, about 1.5 minutes (what the tests run)
#   DEMO_TABLE=1 bash scripts/demo.sh     # then the schedule table (scripts/demo_table.py, a few more minutes)
#
# Knobs (environment): DEMO_OUT (output folder), DEMO_QUICK=1, DEMO_VAE_STEPS, DEMO_AR_STEPS, DEMO_WIDTH, DEMO_TLR,
# DEMO_SEEDS (images per class), DEMO_CFG, DEMO_TOP_K, DEMO_TOP_P, DEMO_ITER_LEFT, DEMO_ITER_RIGHT (sampling),
# DEMO_THREADS (threads of each process; default 1), DEMO_PROGRESS_S (seconds between the progress lines of a running
# stage, read from its logs by scripts/demo_progress.py; default 30, 0 = none), DEMO_TABLE=1. VIAR and VAR train
# and sample side by side, one single-threaded process each: on two cores that is faster than one process with two
# threads, and a loaded machine does not stall it. Every run starts afresh in DEMO_OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${DEMO_OUT:-demo_output}
QUICK=${DEMO_QUICK:-0}
if [ "$QUICK" = 1 ]; then
  VAE_STEPS=${DEMO_VAE_STEPS:-4}; AR_STEPS=${DEMO_AR_STEPS:-3}; WIDTH=${DEMO_WIDTH:-32}; HEADS=2; NSEEDS=${DEMO_SEEDS:-2}
else
  VAE_STEPS=${DEMO_VAE_STEPS:-300}; AR_STEPS=${DEMO_AR_STEPS:-500}; WIDTH=${DEMO_WIDTH:-96}; HEADS=4; NSEEDS=${DEMO_SEEDS:-50}
fi
TLR=${DEMO_TLR:-1.5e-3}
# steps, seeds and sampling defaults: chosen by FID against the held-out digits, reported against the train
# digits, within 7.5 minutes on 2 idle cores (docs/DEMO.md). No guidance: on these models any cfg > 0 trades
# recall and diversity for precision and raises FID; top-k / top-p change nothing measurable.
CFG=${DEMO_CFG:-0}; TOP_K=${DEMO_TOP_K:-0}; TOP_P=${DEMO_TOP_P:-0}
ITER_LEFT=${DEMO_ITER_LEFT:-4}; ITER_RIGHT=${DEMO_ITER_RIGHT:-4}
export OMP_NUM_THREADS=${DEMO_THREADS:-1} MKL_NUM_THREADS=${DEMO_THREADS:-1}
PY=.venv/bin/python
PROGRESS_S=${DEMO_PROGRESS_S:-30}
start_ns=$(date +%s%N)
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
started_at=$(date +%s.%N)
elapsed() { echo $(( ($(date +%s%N) - start_ns) / 1000000000 )); }
log() { echo "[demo $(elapsed)s] $*"; }
# cumulative CPU seconds of the finished children after each stage; `times` is a builtin and must run in this
# shell (a subshell would report its own children), hence the file. demo_score.py turns the marks into stage CPU
# times and the wall time the run would take on an idle machine.
mark() { times > "$OUT/.times"; echo "$1 $(tail -n 1 "$OUT/.times")" >> "$OUT/cpu_times.txt"; }
# a stage's progress lines (steps done / total, ETA) while it runs; the watcher is stopped when the stage ends, and
# by the EXIT trap when the demo stops early
pid_watch=
watch_start() {
  [ "$PROGRESS_S" = 0 ] && return
  $PY scripts/demo_progress.py --every "$PROGRESS_S" --t0 "$started_at" --stage "$@" & pid_watch=$!
}
watch_stop() {
  [ -n "$pid_watch" ] || return 0
  kill "$pid_watch" 2>/dev/null || true
  wait "$pid_watch" 2>/dev/null || true
  pid_watch=
}
trap watch_stop EXIT
wait_both() {   # VIAR's and VAR's processes ($1: what they do; $2, $3: their logs): a failure shows its log's end
  local ok=1
  wait "$pid_viar" || { echo "VIAR $1 failed:"; tail -n 20 "$2"; ok=0; }
  wait "$pid_var" || { echo "VAR $1 failed:"; tail -n 20 "$3"; ok=0; }
  watch_stop
  [ "$ok" = 1 ] || exit 1
}

bash scripts/setup.sh
rm -rf "$OUT/digits" "$OUT/vae" "$OUT/viar" "$OUT/var" "$OUT/samples" "$OUT/results.json" "$OUT/grid.png" \
  "$OUT/pareto.png" "$OUT/schedule_table.md" "$OUT/cpu_times.txt"
mkdir -p "$OUT"

log "1/5 digits -> $OUT/digits (16 px RGB, train/ and val/)"
$PY scripts/make_digits.py --out "$OUT/digits" --size 16
mark digits

log "2/5 tokenizer: multi-scale VQVAE, $VAE_STEPS steps"
watch_start 2/5 "tokenizer=$OUT/vae.stdout"
$PY train_tokenizer.py --data_path "$OUT/digits" --out_dir "$OUT/vae" --reso 16 --mid_reso 1.0 \
  --patch_nums 1,2,3,4 --ch_mult 1,2,4 --num_res_blocks 1 --ch 32 --V 128 --Cvae 16 \
  --bs 64 --lr 1e-3 --restart_every 20 --max_steps "$VAE_STEPS" --log_every 10 > "$OUT/vae.stdout" 2>&1 \
  || { tail -n 20 "$OUT/vae.stdout"; exit 1; }
watch_stop
tail -n 2 "$OUT/vae/log.txt"
t_vae=$(elapsed); mark tokenizer

log "3/5 VIAR (1 pre, 1 implicit, 1 post block) and VAR (depth 6), width $WIDTH, $AR_STEPS steps each, in parallel"
COMMON=(--data_path="$OUT/digits" --pn=1_2_3_4 --patch_size=4 --mid_reso=1.0 --hflip=False
        --vae_ckpt="$OUT/vae/vae.pth" --V=128 --Cvae=16 --vae_ch=32 --vae_ch_mult=1_2_4 --vae_num_res_blocks=1
        --depth=6 --width="$WIDTH" --heads="$HEADS" --bs=64 --tlr="$TLR" --max_steps="$AR_STEPS" --log_every=10
        --device=cpu --exp_name=digits-demo)
# the exports record the demo's sampling defaults: gen_img.py, sampling.py and app.py use them for flags not typed
SAMPLE="cfg=$CFG,top_k=$TOP_K,top_p=$TOP_P"
$PY train.py "${COMMON[@]}" --use_implicit=True --p_depth=1 --jfb_n=0_4 --jfb_m=1_4 \
  --sample_defaults="$SAMPLE,iter_left=$ITER_LEFT,iter_right=$ITER_RIGHT" \
  --local_out_dir_path="$OUT/viar" > "$OUT/viar.stdout" 2>&1 & pid_viar=$!
$PY train.py "${COMMON[@]}" --use_implicit=False --sample_defaults="$SAMPLE" \
  --local_out_dir_path="$OUT/var" > "$OUT/var.stdout" 2>&1 & pid_var=$!
watch_start 3/5 "VIAR=$OUT/viar.stdout" "VAR=$OUT/var.stdout"
wait_both training "$OUT/viar.stdout" "$OUT/var.stdout"
t_ar=$(elapsed); mark transformers

log "4/5 samples: classes 0..9 x $NSEEDS seeds (cfg $CFG, top-k $TOP_K, top-p $TOP_P, VIAR iterations $ITER_LEFT..$ITER_RIGHT)"
SEEDS=$(seq -s ' ' 0 $((NSEEDS - 1)))
# no sampling flags: the exports' recorded defaults (above) apply
GEN=(--vae_ckpt "$OUT/vae/vae.pth" --class_label 0 1 2 3 4 5 6 7 8 9 --seeds $SEEDS --batch_size 50 --device cpu
     --progress True)
$PY gen_img.py --var_ckpt "$OUT/viar/viar-slim.pth" --output_dir "$OUT/samples/viar" "${GEN[@]}" \
  > "$OUT/gen_viar.stdout" 2>&1 & pid_viar=$!
$PY gen_img.py --var_ckpt "$OUT/var/var-slim.pth" --output_dir "$OUT/samples/var" "${GEN[@]}" \
  > "$OUT/gen_var.stdout" 2>&1 & pid_var=$!
watch_start 4/5 "VIAR=$OUT/gen_viar.stdout" "VAR=$OUT/gen_var.stdout"
wait_both sampling "$OUT/gen_viar.stdout" "$OUT/gen_var.stdout"
t_gen=$(elapsed); mark samples

log "5/5 scores -> $OUT/results.json, grid (left VIAR, right VAR; rows = digits 0..9, columns = the first 10 seeds) -> $OUT/grid.png"
$PY scripts/demo_score.py --data_path "$OUT/digits" --vae_ckpt "$OUT/vae/vae.pth" \
  --viar_ckpt "$OUT/viar/viar-slim.pth" --viar_samples "$OUT/samples/viar" \
  --var_ckpt "$OUT/var/var-slim.pth" --var_samples "$OUT/samples/var" \
  --grid "$OUT/grid.png" --started_at "$started_at" --cpu_times "$OUT/cpu_times.txt" \
  --extra "{\"quick\": $QUICK, \"vae_steps\": $VAE_STEPS, \"ar_steps\": $AR_STEPS, \"width\": $WIDTH, \"tlr\": $TLR, \"threads\": $OMP_NUM_THREADS, \"stage_end_seconds\": {\"tokenizer\": $t_vae, \"transformers\": $t_ar, \"samples\": $t_gen}, \"sample\": {\"cfg\": $CFG, \"top_k\": $TOP_K, \"top_p\": $TOP_P, \"iter_left\": $ITER_LEFT, \"iter_right\": $ITER_RIGHT, \"seeds_per_class\": $NSEEDS}, \"load_average_start\": \"$load_start\"}" \
  --out "$OUT/results.json"
rm -f "$OUT/.times"
log "done ($(cut -d' ' -f1-3 /proc/loadavg) load average at the end, $load_start at the start)"

if [ "${DEMO_TABLE:-0}" = 1 ]; then
  log "table: VIAR schedules and VAR over seed sets -> $OUT/results.json (schedule_table), $OUT/schedule_table.md, $OUT/pareto.png"
  $PY scripts/demo_table.py --out_dir "$OUT" --markdown "$OUT/schedule_table.md" ${DEMO_TABLE_ARGS:-}
  log "table done"
fi
