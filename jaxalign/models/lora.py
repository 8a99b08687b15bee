"""LoRA adapters: add to a base model, split for training, merge for export. The PEFT file
format is written by `jaxalign.convert.peft`.

Adapters live in the param tree under `<proj>_lora/{a, b}` next to the weight they adapt
(see `llama.LoRA`), so one apply serves base, adapted and adapter-disabled forwards.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxalign.config import ModelConfig
from jaxalign.models import functional

Params = dict[str, Any]
ADAPTER_SUFFIX = "_lora"   # `<weight>_lora/{a, b}` sits beside the weight it adapts


def split(params: Params) -> tuple[Params, Params]:
    """(adapters, base): two disjoint nested dicts whose union is `params`."""
    adapters, base = {}, {}
    for key, value in params.items():
        if key.endswith(ADAPTER_SUFFIX):
            adapters[key] = value
        elif isinstance(value, dict):
            a, b = split(value)
            if a:
                adapters[key] = a
            if b:
                base[key] = b
        else:
            base[key] = value
    return adapters, base


def combine(a: Params, b: Params) -> Params:
    """Deep union of two disjoint nested dicts (inverse of `split`)."""
    out = dict(b)
    for key, value in a.items():
        out[key] = combine(value, out[key]) if isinstance(value, dict) and key in out else value
    return out


def add_adapters(cfg: ModelConfig, base: Params, mesh: Mesh | None = None, seed: int = 0) -> Params:
    """Fresh adapters (b = 0, so the model is unchanged) joined to base params.

    Only the adapter leaves are materialised: the jitted init returns just them, so XLA
    drops the rest of the random initialisation.
    """
    if cfg.lora_rank == 0:
        return base
    out_sh = None
    if mesh is not None:
        out_sh = split(functional.param_shardings(cfg, mesh))[0]
    adapters = jax.jit(lambda: split(functional.init_params(cfg, None, seed))[0],
                       out_shardings=out_sh)()
    return combine(adapters, base)


def _delta(lora: Params, scale: float) -> jax.Array:
    """scale * a @ b with a's input dims and b's output dims kept (stacked layers first)."""
    a, b = lora["a"], lora["b"]
    n_in = a.ndim - 2           # dims between the layer axis and the rank
    a2 = a.reshape(a.shape[0], -1, a.shape[-1])
    b2 = b.reshape(b.shape[0], b.shape[1], -1)
    d = jnp.einsum("lir,lro->lio", a2.astype(jnp.float32), b2.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST) * scale
    return d.reshape(a.shape[:1] + a.shape[1:1 + n_in] + b.shape[2:])


def merge(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """Folds every adapter into its weight: the base architecture with W + scale * a @ b."""
    if cfg.lora_rank == 0:
        return cfg, params
    adapters, base = split(params)
    scale = cfg.lora_alpha / cfg.lora_rank
    layers = {mod: dict(sub) for mod, sub in base["layers"].items()}
    for module, sub in adapters["layers"].items():
        for name, lora in sub.items():
            weight = name[: -len(ADAPTER_SUFFIX)]
            w = layers[module][weight]
            layers[module][weight] = (w.astype(jnp.float32) + _delta(lora, scale)).astype(w.dtype)
    merged = dict(base, layers=layers)
    return cfg.without_lora(), merged
