#!/usr/bin/env bash
# Set up graphprune on a fresh machine: Fashion-MNIST from Debian, a venv in .venv, the package with [dev].
set -euo pipefail
cd "$(dirname "$0")/.."
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: install the Debian package dataset-fashion-mnist for the Fashion-MNIST demo" >&2
  fi
fi
# torch's wheel and the CUDA libraries it pulls in take ~6 GB in the venv: say so before pip runs out
need_gb=7
if [ ! -x .venv/bin/python ]; then
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "${free_gb:-0}" -lt "$need_gb" ]; then
    echo "error: the venv needs about ${need_gb} GB of disk and $(pwd) has ${free_gb} GB free" >&2
    exit 1
  fi
  python3 -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[dev]"
