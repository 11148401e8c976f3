#!/usr/bin/env bash
# Make (or refresh) the project-local .venv with everything in requirements.txt.
# Idempotent: a second run with nothing changed only checks and returns.
# SETUP_WITHOUT_EVAL=1 leaves out TensorFlow (1.9 GB, needed only by evaluator.py): training, sampling, the demo
# and the app work without it; the evaluator then says how to add it. CI installs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser of the web app's tests (tests/test_app.py): Debian's chromium and its matching chromium-driver,
# installed where missing and apt is usable; elsewhere the browser tests are skipped and say why.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "setup: apt could not install chromium / chromium-driver; the browser tests will be skipped"
  else
    echo "setup: no chromium / chromedriver, and no apt-get as root to install them; the browser tests will be skipped"
  fi
fi
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
