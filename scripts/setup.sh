#!/usr/bin/env bash
# Make (or refresh) the project-local .venv with everything in requirements.txt.
# Idempotent: a second run with nothing changed only checks and returns.
# SETUP_WITHOUT_EVAL=1 leaves out TensorFlow (1.9 GB, needed only by evaluator.py): training, sampling, the demo
# and the app work without it; the evaluator then says how to add it. CI installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages for two groups of tests: Debian's chromium and chromium-driver (the web app in a headless browser,
# tests/test_app.py) and shellcheck (the lint of the launch scripts, tests/test_multinode.py). Installed with apt only
# when asked, SETUP_SYSTEM_PACKAGES=1 (as root; CI sets it); without them those tests are skipped and say so.
missing=()
for tool in chromium chromedriver shellcheck; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "${SETUP_SYSTEM_PACKAGES:-0}" = 1 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium, chromium-driver and shellcheck with apt (about 300 MB)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver shellcheck >/dev/null; } \
      || echo "setup: apt could not install them; the browser and lint tests will be skipped"
  elif [ "${SETUP_SYSTEM_PACKAGES:-0}" = 1 ]; then
    echo "setup: SETUP_SYSTEM_PACKAGES=1 needs apt-get and root; missing ${missing[*]}: those tests will be skipped"
  else
    echo "setup: missing ${missing[*]} (the browser / lint tests will be skipped); SETUP_SYSTEM_PACKAGES=1 bash scripts/setup.sh installs them with apt"
  fi
fi
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
reqs=requirements.txt
size="about 7.3 GB on disk (CUDA libraries 2.7 GB, TensorFlow 1.9 GB, torch 1.2 GB; SETUP_WITHOUT_EVAL=1 leaves TensorFlow out)"
if [ "${SETUP_WITHOUT_EVAL:-0}" = 1 ]; then
  reqs=.venv/requirements-without-eval.txt
  grep -v '^tensorflow' requirements.txt > "$reqs"
  size="about 5.4 GB on disk (CUDA libraries 2.7 GB, torch 1.2 GB; TensorFlow left out)"
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum "$reqs" | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: pip installs the $(grep -cvE '^[[:space:]]*(#|$)' "$reqs") packages of $reqs and their dependencies into .venv"
echo "setup: $size; several minutes to download and unpack, silent until pip ends"
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$reqs"
echo "$want" > "$stamp"
