#!/usr/bin/env bash
# Make (or refresh) the project-local .venv with everything in requirements.txt.
# Idempotent: a second run with nothing changed only checks and returns.
# SETUP_WITHOUT_EVAL=1 leaves out TensorFlow (1.9 GB, needed only by evaluator.py): training, sampling, the demo
# and the app work without it; the evaluator then says how to add it. CI installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
reqs=requirements.txt
if [ "${SETUP_WITHOUT_EVAL:-0}" = 1 ]; then
  reqs=.venv/requirements-without-eval.txt
  grep -v '^tensorflow' requirements.txt > "$reqs"
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum "$reqs" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$reqs"
echo "$want" > "$stamp"
