#!/usr/bin/env bash
# Set up flaxlora on a Cloud TPU VM: a venv with JAX for TPU and flaxlora (no PyTorch needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "jax[tpu]"
.venv/bin/python -m pip install -q -e ".[gguf]"
.venv/bin/python -c "import jax; print(jax.device_count(), 'devices:', jax.devices()[0].device_kind)"
