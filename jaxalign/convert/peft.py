"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

Lives in convert/ (HF formats), so that the model package knows no file format.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxalign import families
from jaxalign.config import ConfigError, ModelConfig
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
    (a directory or hub id) and `revision` (its commit, for a hub id) name that base."""
    if not families.get(cfg.family).peft:
        raise ConfigError(f"a PEFT adapter of a {cfg.family} model is not supported (its HF "
                          "projections are fused, ours are not); export the merged model instead")
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
    write_tensors(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.lora_targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_path, "revision": revision,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
