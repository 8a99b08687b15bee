"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors.

Lives in convert/ (HF formats), so that the model package knows no file format.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxalign import families, rundir
from jaxalign.config import ModelConfig
from jaxalign.convert.hf import write_tensors
from jaxalign.families.base import FusedRow
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
    with rundir.replacing(out, "PEFT adapter export", sources=[base_model_path]) as tmp:
        if jax.process_index() == 0:
            _write_peft(tmp, cfg, params, base_model_path, revision)
    return out


def _write_peft(out: Path, cfg: ModelConfig, params: dict, base_model_path, revision) -> None:
    adapters, _ = lora_mod.split(params)
    ab = {}   # our target -> per-layer (lora_A (r, in), lora_B (out, r)) in nn.Linear layout
    for target in cfg.lora_targets:
        module, weight = TARGETS[target]
        lora = adapters["layers"][module][weight + lora_mod.ADAPTER_SUFFIX]
        a = np.asarray(jax.device_get(lora["a"]))          # (L, *in, r)
        b = np.asarray(jax.device_get(lora["b"]))          # (L, r, *out)
        ab[target] = [(a[i].reshape(-1, cfg.lora_rank).T, b[i].reshape(cfg.lora_rank, -1).T)
                      for i in range(cfg.num_layers)]
    modules, rank_pattern, alpha_pattern = _fuse(cfg, ab)
    tensors: dict[str, np.ndarray] = {}
    for name, layers in modules.items():
        for i, (a, b) in enumerate(layers):
            prefix = f"base_model.model.model.layers.{i}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b)
    classifier = cfg.num_labels > 0
    if classifier:
        tensors["base_model.model.score.weight"] = \
            np.asarray(jax.device_get(params["score"])).T.copy()
    write_tensors(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM",
        "modules_to_save": ["score"] if classifier else None, "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted({n.rpartition(".")[2] for n in modules}), "bias": "none",
        "fan_in_fan_out": False, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        # PEFT names a hub base without our explicit hf:// prefix.
        "base_model_name_or_path": (base_model_path.removeprefix("hf://")
                                    if base_model_path else base_model_path),
        "revision": revision,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fuse(cfg: ModelConfig, ab: dict) -> tuple[dict, dict, dict]:
    """Our adapters -> HF modules ('self_attn.q_proj': per-layer (A, B)). Where the family
    fuses projections into one HF module (Phi-3's qkv_proj), the adapters of its parts become
    one adapter of rank r x parts: A stacked, B block-diagonal (zero rows for a part without an
    adapter), with alpha scaled alike (PEFT's rank_pattern / alpha_pattern), so that
    scale * B A is exactly our updates side by side."""
    names = {v: k for k, v in TARGETS.items()}
    out, ranks, alphas, done = {}, {}, {}, set()
    for row in families.get(cfg.family).rows:
        if not isinstance(row, FusedRow):
            continue
        name = row.hf_key.split(".{i}.")[1].removesuffix(".weight")
        parts = [(names[path[1:]], size(cfg)) for path, _, size in row.parts]
        adapted = [t for t, _ in parts if t in ab]
        done.update(t for t, _ in parts)
        if not adapted:
            continue
        r = cfg.lora_rank * len(adapted)
        layers = []
        for i in range(cfg.num_layers):
            a = np.concatenate([ab[t][i][0] for t in adapted], axis=0)
            b = np.zeros((sum(n for _, n in parts), r), a.dtype)
            row0 = 0
            for t, n in parts:
                if t in ab:
                    j = adapted.index(t) * cfg.lora_rank
                    b[row0:row0 + n, j:j + cfg.lora_rank] = ab[t][i][1]
                row0 += n
            layers.append((a, b))
        out[name] = layers
        short = name.rpartition(".")[2]
        ranks[short], alphas[short] = r, cfg.lora_alpha * len(adapted)
    for t, layers in ab.items():
        if t not in done:
            out[f"{HF_MODULE[TARGETS[t][0]]}.{t}"] = layers
    return out, ranks, alphas
