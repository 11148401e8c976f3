#!/usr/bin/env bash
# The first GPU session's sampling figures in ~5 minutes on one H100/H200 (docs/SPEED.md): VIAR-d30 and VAR-d30 at
# 256 px, batch 64, ours beside the official code's fp16 autocast; eager, --fast, --fast --compile, and CUDA graphs
# (graphs: --fast --compile --compile_scope scale, one captured graph per scale, replayed). Each step is its own
# bench/sample_speed.py run under `timeout` (STEP_S; GRAPH_STEP_S for graphs, which compile ten graphs), writing
# $OUT/<step>/ and a line of $OUT/summary.txt as it ends.
#
#   cp -r /path/to/mobiushy-VIAR .official && echo /.official/ >> .git/info/exclude   # the official code travels
#   bash bench/gpu_check.sh                                   # on the GPU machine (needs torch with CUDA only)
#   DEVICE=cpu EAGER_DTYPE=fp32 MODEL_ARGS='--depth 4 ...' BS=2 bash bench/gpu_check.sh    # a dry run (tests/test_gpu_check.py)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PY:-python3}
OUT=${OUT:-bench_out/gpu_check}
DEVICE=${DEVICE:-cuda}
BS=${BS:-64}
MODEL_ARGS=${MODEL_ARGS:---depth 30}
SCHEDULE=${SCHEDULE:-10:10}
OFFICIAL=${OFFICIAL:-.official}
STEP_S=${STEP_S:-40}
GRAPH_STEP_S=${GRAPH_STEP_S:-70}
EAGER_DTYPE=${EAGER_DTYPE:-fp16}   # the official GPU sampling's autocast (fp16 on a CPU is emulated: slow)
STEPS=${STEPS:-VIAR:eager VAR:eager VIAR:fast VIAR:compiled VIAR:graphs VAR:graphs}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  echo "device=$DEVICE bs=$BS model='$MODEL_ARGS' schedule=$SCHEDULE step_limit=${STEP_S}s graphs=${GRAPH_STEP_S}s"
  [ -d "$OFFICIAL/models" ] && echo "official: $OFFICIAL" || echo "official: none at '$OFFICIAL' (ours only)"
} >"$summary" 2>&1
cat "$summary"

official=()
[ -d "$OFFICIAL/models" ] && official=(--official "$OFFICIAL" --official_dtypes "$EAGER_DTYPE")

for step in $STEPS; do
  kind=${step%%:*}
  mode=${step#*:}
  case $mode in
    eager) extra=(--dtype "$EAGER_DTYPE" "${official[@]}") ;;
    fast) extra=(--fast) ;;
    compiled) extra=(--fast --compile) ;;
    graphs) extra=(--fast --compile --compile_scope scale) ;;
    *) echo "unknown mode '$mode' in STEPS (eager, fast, compiled, graphs)" >&2; exit 2 ;;
  esac
  limit=$STEP_S
  [ "$mode" = graphs ] && limit=$GRAPH_STEP_S
  name="${kind}_${mode}"
  # shellcheck disable=SC2086  # MODEL_ARGS is a list of flags
  timeout "$limit" "$PY" bench/sample_speed.py --device "$DEVICE" --models "$kind" --schedules "$SCHEDULE" \
    --bs "$BS" --warmup 1 --reps 2 --out "$OUT/$name" $MODEL_ARGS "${extra[@]}" >"$OUT/$name.log" 2>&1
  rc=$?
  verdict="rc=$rc"
  [ "$rc" = 124 ] && verdict="rc=124 (over ${limit}s)"
  echo "$name: $verdict; log $OUT/$name.log" | tee -a "$summary"
  [ -f "$OUT/$name/sample_speed.md" ] && cat "$OUT/$name/sample_speed.md" >>"$summary"
done
echo "summary: $summary"
