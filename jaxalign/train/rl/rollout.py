"""RL rollouts: prompt tokens in; sampled responses and everything computed on them out.

The prompts come from `prompts.py`. The device side is one pure function (`rollout`) that
samples from the policy's live params with the KV-cache sampler and, in the same jitted program, runs the
training forward over prompt + response for the quantities PPO / GRPO need: the policy's
log-probs (recomputed, not the sampler's), the reference's, the values and the reward
model's score.

Sequence layout: prompt left-padded to P, response right-padded to N; segment id 1 on real
tokens, 0 on padding; positions count real tokens from 0. The forwards run either one row of
T = P + N tokens per response or one row [prompt | r1 | ... | rG] per prompt group
(`groups.py`, `group` below); either way response token i is predicted by the hidden state
before it, and the logits, values and log-probs of the response come out (B, N).

Shape suffixes: B rows, P prompt length, N response length, T = P + N, D hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.config import ModelConfig
from jaxalign.generate import generate
from jaxalign.losses.xent import head_logits, scan_chunks
from jaxalign.models import functional, heads, lora
from jaxalign.train.rl import groups


# ----------------------------------------------------------------------------- device side

@dataclasses.dataclass(frozen=True)
class Models:
    """Static description of the roles (hashable: part of the compile cache key).

    ref:    'adapters_off' (LoRA: the policy with use_lora=False) or 'copy' (aux['ref']).
    value:  'shared' (a head on the policy trunk, trainable['value_head']), 'separate' (a
            critic Llama, trainable / frozen ['critic']) or 'none' (GRPO).
    """
    policy: ModelConfig
    ref: str
    value: str
    critic: ModelConfig | None = None
    reward: ModelConfig | None = None


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_ids: tuple[int, ...]
    pad_id: int
    decode_scan_layers: bool | None = None   # the prefill's layer form; None: the policy's
    decode_dtype: str | None = None          # sampling's compute dtype; None: the policy's
    logits_chunk: int = 128
    min_new_tokens: int = 0                  # EOS banned before this many tokens (0: off)


def sequence(prompt_BP, prompt_mask_BP, response_BN, response_mask_BN) -> dict:
    """One row per response (see the module docstring)."""
    return groups.per_row(prompt_BP, prompt_mask_BP, response_BN, response_mask_BN)


def response_stats(hidden_BND, head, targets_BN, *, head_is_VD: bool, temperature: float,
                   chunk: int, softcap: float | None = None, entropy_grad: bool = True):
    """log p(target) and the entropy (nats) of softmax(logits / temperature), fp32, at every
    response position, `chunk` positions at a time (logits rematerialised in the backward
    pass: peak memory holds one (B, chunk, V) block). The temperature-scaled, untruncated
    distribution is the one the sampler reports log-probs under (`generate._select`); the
    logits are soft-capped first (`softcap`, Gemma 2) as the model's forward caps them.
    `entropy_grad=False`: the entropy is a metric only, computed under stop_gradient, so the
    backward pass has no entropy term at all (a 0 coefficient would still run one)."""
    sg = (lambda x: x) if entropy_grad else jax.lax.stop_gradient

    def stats(h_BCD, t_BC):
        logits_BCV = head_logits(h_BCD, head, head_is_VD=head_is_VD, softcap=softcap) / temperature
        lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
        picked_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        flat_BCV, flat_lse_BC = sg(logits_BCV), sg(lse_BC)
        p_BCV = jnp.exp(flat_BCV - flat_lse_BC[..., None])
        entropy_BC = flat_lse_BC - (p_BCV * flat_BCV).sum(-1)
        return picked_BC - lse_BC, entropy_BC

    return scan_chunks(hidden_BND, targets_BN, chunk, stats)


def _response_hidden(cfg: ModelConfig, params, batch: dict, *, group: int = 1,
                     use_lora: bool = True):
    """(B, N, D) hidden states predicting the response tokens; `batch` holds prompt_BP,
    prompt_mask_BP, response_BN, mask_BN (rows group-major when group > 1)."""
    P, N = batch["prompt_BP"].shape[1], batch["response_BN"].shape[1]
    rows = groups.layout(batch["prompt_BP"], batch["prompt_mask_BP"], batch["response_BN"],
                         batch["mask_BN"], group)
    _, hidden_RTD, _ = functional.apply(cfg, params, rows["tokens_BT"],
                                        positions_BT=rows["positions_BT"],
                                        segment_ids_BT=rows["segment_ids_BT"],
                                        branch_ids_BT=rows.get("branch_ids_BT"),
                                        return_logits=False, use_lora=use_lora)
    return groups.response_hidden(hidden_RTD, P, N, group)


def policy_forward(cfg: ModelConfig, params, batch: dict, *, temperature: float, chunk: int,
                   use_lora: bool = True, group: int = 1, entropy_grad: bool = True):
    """-> (logp_BN, entropy_BN, hidden_BND) of the response under `params`."""
    hidden_BND = _response_hidden(cfg, params, batch, group=group, use_lora=use_lora)
    head, head_is_VD = functional.lm_head(cfg, params)
    logp_BN, ent_BN = response_stats(hidden_BND, head, batch["response_BN"], head_is_VD=head_is_VD,
                                     temperature=temperature, chunk=chunk,
                                     softcap=cfg.final_logit_softcap, entropy_grad=entropy_grad)
    return logp_BN, ent_BN, hidden_BND


def values(models: Models, trainable, frozen, batch: dict, policy_hidden_BND,
           group: int = 1) -> jax.Array:
    """Per-token values (B, N) fp32: the value head on the policy trunk, or the critic."""
    if models.value == "shared":
        return heads.project(trainable["value_head"], policy_hidden_BND)[..., 0]
    if models.value == "separate":
        critic = lora.combine(trainable["critic"], frozen.get("critic", {}))
        hidden_BND = _response_hidden(models.critic, critic, batch, group=group)
        return heads.project(critic, hidden_BND)[..., 0]
    return jnp.zeros(batch["response_BN"].shape, jnp.float32)


def _sample(models: Models, sampling: Sampling, policy, prompt_BP, prompt_mask_BP, key,
            prefill_group: int = 1) -> dict:
    gen_cfg = models.policy
    if sampling.decode_scan_layers is not None:
        # Same param layout either way: a scanned prefill keeps the program small (the decode
        # steps read per-layer weights either way, see generate.py).
        gen_cfg = gen_cfg.replace(scan_layers=sampling.decode_scan_layers)
    if sampling.decode_dtype is not None:
        gen_cfg = gen_cfg.replace(dtype=sampling.decode_dtype)
    return generate(gen_cfg, policy, prompt_BP, prompt_mask_BP, key,
                    max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                    top_k=sampling.top_k, top_p=sampling.top_p, eos_ids=sampling.eos_ids,
                    pad_id=sampling.pad_id, prefill_group=prefill_group,
                    min_new_tokens=sampling.min_new_tokens)


def rollout(models: Models, sampling: Sampling, trainable, frozen, aux, prompt_BP, prompt_mask_BP,
            key, *, generations: int = 1, group: int = 1,
            policy_logp: bool = True) -> dict[str, jax.Array]:
    """Sample, then score every response with one forward per role. Pure; jit it with
    `models`, `sampling`, `generations`, `group` and `policy_logp` static. `aux`: {'ref': params}
    when models.ref == 'copy', {'reward': params} with a reward model. Rows come in groups of
    `generations` equal prompts: the sampler's prefill runs once per group; `group` (1 or
    `generations`) is the layout of the policy / reference / critic forwards (`groups.py`).
    `policy_logp=False`: no policy forward here (the update's first step is it,
    `objectives.reuses`): old_logp_BN comes out 0 with fresh_old_B 1, and no entropy_BN."""
    policy = lora.combine(trainable["policy"], frozen["policy"])
    out = _sample(models, sampling, policy, prompt_BP, prompt_mask_BP, key, generations)
    batch = sequence(prompt_BP, prompt_mask_BP, out["tokens_BN"], out["mask_BN"])
    batch.update(prompt_BP=prompt_BP, prompt_mask_BP=prompt_mask_BP,
                 response_BN=out["tokens_BN"], mask_BN=out["mask_BN"])
    mask_BN = out["mask_BN"].astype(jnp.float32)
    kw = dict(temperature=sampling.temperature, chunk=sampling.logits_chunk, group=group)
    if policy_logp:
        logp_BN, ent_BN, hidden_BND = policy_forward(models.policy, policy, batch, **kw)
        mine = {"old_logp_BN": logp_BN * mask_BN, "entropy_BN": ent_BN * mask_BN,
                "fresh_old_B": jnp.zeros(mask_BN.shape[:1], jnp.float32),
                "values_BN": values(models, trainable, frozen, batch, hidden_BND, group) * mask_BN}
    else:
        assert models.value == "none", "the value head needs the rollout's policy forward"
        mine = {"old_logp_BN": jnp.zeros_like(mask_BN),
                "fresh_old_B": jnp.ones(mask_BN.shape[:1], jnp.float32),
                "values_BN": jnp.zeros_like(mask_BN)}
    if models.ref == "adapters_off":
        ref_logp_BN = policy_forward(models.policy, policy, batch, use_lora=False, **kw)[0]
    else:
        ref_logp_BN = policy_forward(models.policy, aux["ref"], batch, **kw)[0]
    if models.reward is not None:
        score_B = heads.score(models.reward, aux["reward"], batch["tokens_BT"],
                              batch["segment_ids_BT"], batch["positions_BT"])
    else:
        score_B = jnp.zeros(prompt_BP.shape[:1], jnp.float32)
    return {**batch, **mine,
            "sampler_logp_BN": out["logprobs_BN"],
            "ref_logp_BN": ref_logp_BN * mask_BN,
            "rm_score_B": score_B,
            "lengths_B": out["lengths_B"]}


def sample_and_score(models: Models, sampling: Sampling, trainable, frozen, aux, prompt_BP,
                     prompt_mask_BP, key) -> dict[str, jax.Array]:
    """The held-out evaluation's program: sample (greedy at temperature 0) from the live
    policy, and the reward model's score of each completion; no log-probs, values or
    reference (nothing trains on these rows). Pure; jit it with `models`, `sampling` static."""
    policy = lora.combine(trainable["policy"], frozen["policy"])
    out = _sample(models, sampling, policy, prompt_BP, prompt_mask_BP, key)
    if models.reward is not None:
        batch = sequence(prompt_BP, prompt_mask_BP, out["tokens_BN"], out["mask_BN"])
        score_B = heads.score(models.reward, aux["reward"], batch["tokens_BT"],
                              batch["segment_ids_BT"], batch["positions_BT"])
    else:
        score_B = jnp.zeros(prompt_BP.shape[:1], jnp.float32)
    return {"response_BN": out["tokens_BN"], "lengths_B": out["lengths_B"], "rm_score_B": score_B}


def has_eos(response_BN: np.ndarray, lengths_B: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """Whether each response ended with an EOS (rather than running out of tokens)."""
    last = response_BN[np.arange(len(lengths_B)), np.maximum(lengths_B - 1, 0)]
    return (lengths_B > 0) & np.isin(last, np.asarray(list(eos_ids) or [-1]))


def decode(tokenizer, response_BN: np.ndarray, lengths_B: np.ndarray) -> list[str]:
    return tokenizer.batch_decode(completion_ids(response_BN, lengths_B), skip_special_tokens=True)



def completion_ids(response_BN: np.ndarray, lengths_B: np.ndarray) -> list[list[int]]:
    """Each response's sampled token ids, EOS included (TRL's `completion_ids`)."""
    return [row[:n].tolist() for row, n in zip(response_BN, lengths_B)]
