#!/usr/bin/env bash
# Minimal environment to run scio: a virtualenv in .venv with the CPU build of torch and
# scio installed (editable). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e .
echo "scio ready in .venv"
