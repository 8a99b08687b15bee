"""KV-cache sampling: prefill + `lax.while_loop` decode, as a pure function of arrays.

`generate` is traceable inside a larger jit (PPO samples from the live policy params);
`make_generate_fn` jits it once per (config, sampling settings) and shape bucket;
`generate_text` is the host-side convenience (tokenize, left-pad, decode).

Shape suffixes: B batch, P prompt length (left-padded), N new tokens, S cache slots, V vocab.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.config import JaxalignError, ModelConfig
from jaxalign.models import functional, lora
from jaxalign.models.llama import CACHE_NAMES, init_cache
from jaxalign.sharding import constrain


def _filter_top_k_top_p(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Masks (to -inf) the tokens outside the top-k, then outside the nucleus of mass top_p.

    Same order and semantics as transformers' TopK / TopP warpers: the nucleus is computed on
    the distribution renormalised after top-k, and always keeps at least the best token.
    """
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV >= kth_B1, logits_BV, -jnp.inf)
    if top_p < 1.0:
        sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep a token while the mass strictly above it is still short of top_p.
        keep_BV = ((jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p) & (sorted_BV > -jnp.inf)
        keep_BV = keep_BV.at[:, 0].set(True)
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)
    return logits_BV


def _select(logits_BV, key, temperature: float, top_k: int, top_p: float):
    """Next token and its log-prob. Sampling settings are static: branches resolve at trace time.

    The log-prob is log_softmax(logits / T) of the chosen token, i.e. under the
    temperature-scaled distribution *before* top-k / top-p truncation (T = 1 when greedy).
    That is the policy distribution PPO's ratio and KL are defined on; the truncated one
    would give -inf / undefined ratios for tokens the policy could still produce.
    """
    if temperature == 0.0:
        tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        scaled_BV = logits_BV
    else:
        scaled_BV = logits_BV / temperature
        filtered_BV = _filter_top_k_top_p(scaled_BV, top_k, top_p)
        tok_B = jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)
    logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]


def decode_loops(prefill: int, max_new_tokens: int, chunk: int = 64,
                 max_loops: int = 4) -> tuple[tuple[int, int], ...]:
    """The decode steps cut into loops: ((stop_step, cache_slots), ...).

    Step i feeds a token into slot prefill + i, so a loop that ends at step `stop` needs
    prefill + stop slots, and its attention reads only those (the cache grows between loops)
    instead of all prefill + N from the first step on: with a long `max_new_tokens` the early
    steps no longer read an empty cache. Equal loops of about `chunk` steps, at most
    `max_loops` (each loop is one more compiled decode body): attention then reads
    (K + 1) / 2K of the full cache on average over K loops, against 1/2 for an exact bound."""
    n = min(max_loops, max(1, -(-max_new_tokens // chunk)))
    stops = sorted({-(-max_new_tokens * (j + 1) // n) for j in range(n)})
    return tuple((stop, prefill + stop) for stop in stops)


def decode_params(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """The weights every decode step reads, made once per call: LoRA adapters folded into
    their weights (W + scale * a @ b, exact up to fp32 round-off), so a step reads plain
    weights instead of adding every adapter product on every token. Stacked params only
    (`generate` unstacks them after the prefill); a per-layer tree is taken as prepared."""
    if cfg.lora_rank > 0 and not isinstance(params["layers"], tuple) and lora.split(params)[0]:
        return lora.merge(cfg, params)
    return cfg, params


def generate(cfg: ModelConfig, params, prompt_tokens_BP: jax.Array, prompt_mask_BP: jax.Array,
             key: jax.Array, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_ids: Sequence[int] = (), pad_id: int = 0,
             prefill_group: int = 1, cache_chunk: int = 64, min_new_tokens: int = 0) -> dict:
    """Samples up to `max_new_tokens` tokens after each LEFT-padded prompt (mask 0 = pad).

    `prefill_group` G > 1: rows come in groups of G equal prompts (RL's completions per
    prompt); the prompt's KV cache is computed once per group and repeated to its G rows.

    Every row needs at least one real prompt token (e.g. BOS). Returns
      tokens_BN   int32, pad_id after a row's first EOS (and after an early stop);
      mask_BN     int32, 1 for generated tokens up to and including the first EOS;
      logprobs_BN fp32, log_softmax(logits / T) of each token (see `_select`), 0 where masked;
      lengths_B   int32, mask_BN.sum(-1).
    The settings after `key` must be Python values (static under jit). Not differentiable
    (a while_loop with a data-dependent stop): PPO recomputes log-probs with a forward pass.
    `cache_chunk`: about how many decode steps share one cache size (`decode_loops`).
    `min_new_tokens`: the EOS ids cannot be sampled before that many tokens (transformers'
    `min_new_tokens`: their logits are -inf, so the reported log-probs are under that
    distribution too); 0: off.
    """
    B, P = prompt_tokens_BP.shape
    N = max_new_tokens
    mask_BP = prompt_mask_BP.astype(jnp.int32)
    prompt_len_B = mask_BP.sum(axis=-1)
    eos_E = jnp.asarray(tuple(eos_ids) or (-1,), jnp.int32)  # -1: no token ever matches
    cfg, params = decode_params(cfg, params)

    # The cache holds the prompt and every fed-back token (the last sampled one never is
    # fed): P - 1 + N slots at the end, fewer before (`decode_loops`). It is kept in the
    # compute dtype: the uncached forward attends to k/v in that dtype too, so a wider cache
    # would cost memory without changing a number.
    loops = decode_loops(P - 1, N, cache_chunk)
    stacked = not isinstance(params["layers"], tuple)
    G = prefill_group if P > 1 else 1   # the prefill's cache: one row per group
    cache = _constrain_cache(init_cache(cfg, B // G, loops[0][1], per_layer=not stacked))
    if P > 1:
        # Prefill all but the last prompt token; no logits needed (a (B, P, V) fp32 tensor
        # would dominate memory for long prompts). The last prompt token, always real under
        # left padding, goes through the decode step below, whose logits give new token 0:
        # one code path produces every sampled token.
        positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=-1) - 1, 0)
        _, _, cache = functional.apply(cfg, params, prompt_tokens_BP[::G, :-1],
                                       positions_BT=positions_BP[::G, :-1],
                                       segment_ids_BT=mask_BP[::G, :-1], cache=cache,
                                       return_logits=False)
        if G > 1:   # the group's rows share its prompt: repeat each cache row G times
            rep = lambda x, axis: jnp.repeat(x, G, axis=axis)
            cache = _constrain_cache({
                "k": tuple(rep(a, 0) for a in cache["k"]) if not stacked else rep(cache["k"], 1),
                "v": tuple(rep(a, 0) for a in cache["v"]) if not stacked else rep(cache["v"], 1),
                "valid": rep(cache["valid"], 0), "end": cache["end"]})
    if stacked:
        # Decode steps read per-layer weights in place (`Llama._loop_layers`): a scan over
        # stacked weights would copy every layer's slice on every step. So the weights are
        # sliced once per call here (the prefill above still ran as one scan, which keeps
        # the program small), and the cache is split by layer.
        # Weights stored wider than the compute dtype (fp32 params, bf16 decoding) are cast in
        # the same pass, so the steps read half the bytes instead of casting every step.
        cast = cfg.dtype if cfg.dtype != cfg.param_dtype else None
        params = functional.unstack_layers(cfg, params, cast)
        cache = _constrain_cache({**cache, "k": tuple(cache["k"]), "v": tuple(cache["v"])})

    def step(state):
        i, cache, tok_in_B, tokens_BN, logprobs_BN, out_mask_BN, done_B = state
        # Token fed at step i sits at position prompt_len - 1 + i (positions start at 0).
        pos_B1 = (prompt_len_B - 1 + i)[:, None]
        logits_B1V, _, cache = functional.apply(cfg, params, tok_in_B[:, None], positions_BT=pos_B1,
                                                segment_ids_BT=jnp.ones_like(pos_B1), cache=cache)
        logits_BV = logits_B1V[:, 0]
        if min_new_tokens > 0 and eos_ids:
            early = i < min_new_tokens
            logits_BV = logits_BV.at[:, eos_E].set(jnp.where(early, -jnp.inf, logits_BV[:, eos_E]))
        tok_B, logp_B = _select(logits_BV, jax.random.fold_in(key, i), temperature, top_k, top_p)
        # Finished rows keep running (the batch is one array) but emit pad and are masked.
        tok_B = jnp.where(done_B, pad_id, tok_B)
        tokens_BN = tokens_BN.at[:, i].set(tok_B)
        logprobs_BN = logprobs_BN.at[:, i].set(jnp.where(done_B, 0.0, logp_B))
        out_mask_BN = out_mask_BN.at[:, i].set((~done_B).astype(jnp.int32))
        done_B = done_B | jnp.isin(tok_B, eos_E)
        return i + 1, cache, tok_B, tokens_BN, logprobs_BN, out_mask_BN, done_B

    state = (jnp.int32(0), cache, prompt_tokens_BP[:, -1].astype(jnp.int32),
             jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
             jnp.zeros((B, N), jnp.int32), jnp.zeros((B,), bool))
    for stop, slots in loops:
        # Every row done stops each remaining loop at its first test.
        def cond(state, stop=stop):
            i, done_B = state[0], state[-1]
            return (i < stop) & ~jnp.all(done_B)

        state = (state[0], _grow_cache(state[1], slots), *state[2:])
        state = jax.lax.while_loop(cond, step, state)
    _, _, _, tokens_BN, logprobs_BN, out_mask_BN, _ = state
    return {"tokens_BN": tokens_BN, "mask_BN": out_mask_BN, "logprobs_BN": logprobs_BN,
            "lengths_B": out_mask_BN.sum(axis=-1)}


def _grow_cache(cache, slots: int):
    """The per-layer cache padded with empty (invalid) slots up to `slots`."""
    extra = slots - cache["valid"].shape[1]
    if extra == 0:
        return cache

    def pad(a):
        return jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2))

    return _constrain_cache({"k": tuple(map(pad, cache["k"])), "v": tuple(map(pad, cache["v"])),
                             "valid": pad(cache["valid"]), "end": cache["end"]})


def _constrain_cache(cache):
    """Under a mesh (PPO), shards the cache like the batch and the kv heads; without one
    `constrain` is a no-op. Per-layer k / v (tuples) drop the leading 'layers' name."""
    return {name: (tuple(constrain(a, CACHE_NAMES[name][1:]) for a in x) if isinstance(x, tuple)
                   else constrain(x, CACHE_NAMES[name])) for name, x in cache.items()}


@functools.lru_cache(maxsize=32)
def make_generate_fn(cfg: ModelConfig, max_new_tokens: int, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, eos_ids: tuple[int, ...] = (),
                     pad_id: int = 0, min_new_tokens: int = 0):
    """Jitted `fn(params, prompt_tokens_BP, prompt_mask_BP, key) -> generate(...)'s dict`.

    Cached on its (hashable) settings, so repeated calls reuse one jitted function, which
    compiles once per input shape: callers should bucket P (see `bucket_length`).
    """
    if max_new_tokens < 1:
        raise JaxalignError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise JaxalignError(f"temperature must be >= 0, got {temperature}")
    if top_k < 0:
        raise JaxalignError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise JaxalignError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise JaxalignError(f"min_new_tokens must be in [0, max_new_tokens = {max_new_tokens}], "
                            f"got {min_new_tokens}")
    fn = functools.partial(generate, cfg, max_new_tokens=max_new_tokens,
                           temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                           eos_ids=tuple(int(e) for e in eos_ids), pad_id=int(pad_id),
                           min_new_tokens=int(min_new_tokens))
    return jax.jit(fn)


# ----------------------------------------------------------------------------- host side

def bucket_length(n: int, minimum: int = 16, step: int = 256) -> int:
    """Padded prompt length: a power of two (>= minimum) up to `step`, then multiples of it,
    so prompts of similar length share one compiled program."""
    if n <= step:
        return max(minimum, 1 << max(n - 1, 0).bit_length())
    return -(-n // step) * step


def eos_ids_for(tokenizer, model_dir: str | Path | None = None) -> tuple[int, ...]:
    """EOS ids: generation_config.json's `eos_token_id` (int or list) plus the tokenizer's."""
    ids: list[int] = []
    model_dir = model_dir or getattr(tokenizer, "name_or_path", None)
    gen_file = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen_file is not None and gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return tuple(dict.fromkeys(int(i) for i in ids))  # de-duplicated, order kept


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool) -> list[list[int]]:
    if not chat:
        return [tokenizer(p).input_ids for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise JaxalignError(f"--chat: the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} "
                            "has no chat template (tokenizer_config.json chat_template or "
                            "chat_template.jinja); drop --chat to complete the raw prompt")
    # The template already spells out its special tokens; adding BOS again would double it
    # (this is what apply_chat_template(tokenize=True) does too).
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def left_pad(ids: Sequence[Sequence[int]], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens_BP = np.full((len(ids), length), pad_id, np.int32)
    mask_BP = np.zeros((len(ids), length), np.int32)
    for b, row in enumerate(ids):
        if not 0 < len(row) <= length:
            raise JaxalignError(f"prompt {b} has {len(row)} tokens; need 1..{length}")
        tokens_BP[b, length - len(row):] = row
        mask_BP[b, length - len(row):] = 1
    return tokens_BP, mask_BP


def generate_ids(cfg: ModelConfig, params, prompt_ids: Sequence[Sequence[int]], *,
                 max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int = 0, eos_ids: Sequence[int] = (),
                 pad_id: int = 0) -> list[list[int]]:
    """Completion token ids per prompt (up to and including EOS), batched in one call."""
    longest = max(len(r) for r in prompt_ids)
    functional.check_positions(cfg, longest + max_new_tokens,
                    f"the longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens})")
    P = bucket_length(longest)
    tokens_BP, mask_BP = left_pad(prompt_ids, pad_id, P)
    fn = make_generate_fn(cfg, max_new_tokens, float(temperature), int(top_k), float(top_p),
                          tuple(eos_ids), int(pad_id))
    out = jax.device_get(fn(params, tokens_BP, mask_BP, jax.random.key(seed)))
    return [out["tokens_BN"][b, :n].tolist() for b, n in enumerate(out["lengths_B"])]


def generate_text(cfg: ModelConfig, params, tokenizer, prompts: Sequence[str], *, chat: bool,
                  max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int = 0, eos_ids: Sequence[int] | None = None) -> list[str]:
    """Completes each prompt (the chat template's user turn when `chat`); returns the
    completions only, special tokens skipped. EOS ids default to `eos_ids_for(tokenizer)`."""
    eos = tuple(eos_ids) if eos_ids is not None else eos_ids_for(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or (0,))[0]
    ids = generate_ids(cfg, params, encode_prompts(tokenizer, prompts, chat=chat),
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, eos_ids=eos, pad_id=pad_id)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
