#!/usr/bin/env bash
# GPU checks in one call of a lent accelerator machine (see the README's "GPU" section).
#
#   [WORKLOADS="sft sft-lora dpo grpo"] bash scripts/device_check.sh [BENCH_ARGS...]
#
# Expects, in the checkout (carried, git-ignored): .whl/ holding the pure-Python wheels that
# machine lacks (trl, peft, datasets, dill, multiprocess, tensorboardX; its own jax / flax / optax /
# orbax are used: our pinned flax 0.12.8 does not import under its jax 0.11.2), and
# .gpu/smollm2/ holding SmolLM2-135M's config.json, tokenizer and chat template files (the weights stay
# behind: a random model of the same shape is timed).
# Writes logs under $OUT (default /tmp/device_out).
#
# 1. versions and the device; 2. the model-fidelity tests (tests/test_llama_parity.py) with
# JAX on the GPU and the transformers reference on the CPU; 3. scripts/bench.py WORKLOAD on the
# GPU for each of $WORKLOADS, ours (the CLI) vs TRL, both sides on the same random SmolLM2-shaped
# weights, in the user's environment (JAX preallocates: nvidia-smi's column shows that pool).
set -uo pipefail
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF' || exit 1
import flax, jax, optax, torch, transformers, trl
print("jax", jax.__version__, jax.devices(), "| flax", flax.__version__, "| optax", optax.__version__,
      "| torch", torch.__version__, "| transformers", transformers.__version__, "| trl", trl.__version__)
EOF

echo "== model fidelity on the GPU"
timeout 240 python3 -m pytest -q -x -m "not slow" -p no:cacheprovider tests/test_llama_parity.py \
    2>&1 | tee "$OUT/parity.log" | tail -15

echo "== random SmolLM2-shaped model"
python3 - <<'EOF' || exit 1
import shutil, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig.from_pretrained(".gpu/smollm2")
LlamaForCausalLM(cfg).save_pretrained("/tmp/smollm2_random")
import os
for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
    if os.path.exists(f".gpu/smollm2/{f}"):  # the chat template: grpo renders its prompts with it
        shutil.copy(f".gpu/smollm2/{f}", "/tmp/smollm2_random/")
print("saved /tmp/smollm2_random")
EOF

for w in ${WORKLOADS:-sft sft-lora dpo grpo}; do
    echo "== bench.py $w on the GPU"
    env -u XLA_PYTHON_CLIENT_PREALLOCATE python3 scripts/bench.py "$w" --model /tmp/smollm2_random \
        --out "$OUT/bench_$w.txt" "$@" 2>"$OUT/bench_$w.err" | grep -v '^{'
done
