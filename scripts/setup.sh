#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxalign with its test extra. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch==2.13.0 (test extra) resolves to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c "import jaxalign, jax, flax, optax, orbax.checkpoint, torch, transformers, gguf"
