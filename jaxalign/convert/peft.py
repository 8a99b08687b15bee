"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

Lives in convert/ (HF formats), so that the model package knows no file format.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxalign.config import ModelConfig
from jaxalign.convert.hf import write_tensors
from jaxalign.models import lora as lora_mod

# our (module, weight) for each HF projection name
TARGETS = {"q_proj": ("attn", "q"), "k_proj": ("attn", "k"), "v_proj": ("attn", "v"),
           "o_proj": ("attn", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
           "down_proj": ("mlp", "down")}
HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def save_peft(out_dir: str | Path, cfg: ModelConfig, params: dict,
              base_model_path: str | None = None, revision: str | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors that `peft.PeftModel` loads onto
    the HF base model (nn.Linear layout: lora_A (r, in), lora_B (out, r)). `base_model_path`
    (a directory or hub id) and `revision` (its commit, for a hub id) name that base.

    A classifier (reward model, cfg.num_labels > 0) trains a fresh score head beside its
    adapters: it is written as PEFT writes a SEQ_CLS adapter, the head as a module to save
    (`base_model.model.score.weight`, HF layout (num_labels, D)), so that
    AutoModelForSequenceClassification(base, num_labels=...) + the adapter scores as we do."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapters, _ = lora_mod.split(params)
    tensors: dict[str, np.ndarray] = {}
    for target in cfg.lora_targets:
        module, weight = TARGETS[target]
        lora = adapters["layers"][module][weight + lora_mod.ADAPTER_SUFFIX]
        a = np.asarray(jax.device_get(lora["a"]))          # (L, *in, r)
        b = np.asarray(jax.device_get(lora["b"]))          # (L, r, *out)
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULE[module]}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = a[i].reshape(-1, cfg.lora_rank).T.copy()
            tensors[f"{prefix}.lora_B.weight"] = b[i].reshape(cfg.lora_rank, -1).T.copy()
    classifier = cfg.num_labels > 0
    if classifier:
        tensors["base_model.model.score.weight"] = \
            np.asarray(jax.device_get(params["score"])).T.copy()
    write_tensors(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "modules_to_save": ["score"] if classifier else None, "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.lora_targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_path, "revision": revision,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
