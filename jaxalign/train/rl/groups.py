"""How a rollout's rows are laid out for the training forwards, and how they are trimmed.

Two layouts of the same rows (rows group-major: prompt i owns rows i*G .. i*G + G - 1):

  per row   one row per response, [prompt (left-padded to P) | response (right-padded to N)];
  grouped   one row per prompt, [prompt | r1 | ... | rG] with branch ids 0 / 1..G
            (`Llama.__call__`): each response attends to the prompt and to itself only, and its
            positions continue from the prompt's end, so every response token sees exactly
            what it sees in a row of its own. The prompt is run once instead of G times.

Response token i of branch g is predicted by the hidden state before it: the prompt's last
slot for i = 0 (shared by the G branches), the slot before it in the branch otherwise.
Both layouts give the same (B, N, D) response hidden states; the log-probs, values and
losses downstream see no difference.

`group_size` picks the grouped layout when it is exact for the update's minibatches (whole
groups per micro batch) and does less arithmetic; `trim` cuts a rollout's padding to the
batch's own prompt and response buckets.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxalign.config import ModelConfig
from jaxalign.generate import bucket_length


def per_row(prompt_BP, prompt_mask_BP, response_BN, response_mask_BN) -> dict:
    """[prompt | response] per row; segment id 1 on real tokens, positions count them."""
    segs_BT = jnp.concatenate([prompt_mask_BP, response_mask_BN], axis=1).astype(jnp.int32)
    return {"tokens_BT": jnp.concatenate([prompt_BP, response_BN], axis=1).astype(jnp.int32),
            "segment_ids_BT": segs_BT,
            "positions_BT": jnp.maximum(jnp.cumsum(segs_BT, axis=1) - 1, 0).astype(jnp.int32)}


def grouped(prompt_BP, prompt_mask_BP, response_BN, response_mask_BN, G: int) -> dict:
    """[prompt | r1 | ... | rG] per prompt (R = B / G rows of T = P + G N tokens)."""
    B, P = prompt_BP.shape
    N = response_BN.shape[1]
    R = B // G
    prompt_RP, pmask_RP = prompt_BP[::G], prompt_mask_BP[::G].astype(jnp.int32)
    plen_R = pmask_RP.sum(axis=1)
    pos_RP = jnp.maximum(jnp.cumsum(pmask_RP, axis=1) - 1, 0)
    pos_RM = plen_R[:, None] + jnp.tile(jnp.arange(N, dtype=jnp.int32), G)[None]
    branch_M = jnp.repeat(jnp.arange(1, G + 1, dtype=jnp.int32), N)
    return {"tokens_BT": jnp.concatenate([prompt_RP, response_BN.reshape(R, G * N)],
                                         axis=1).astype(jnp.int32),
            "segment_ids_BT": jnp.concatenate([pmask_RP, response_mask_BN.reshape(R, G * N)
                                               .astype(jnp.int32)], axis=1),
            "positions_BT": jnp.concatenate([pos_RP, pos_RM], axis=1).astype(jnp.int32),
            "branch_ids_BT": jnp.concatenate([jnp.zeros((R, P), jnp.int32),
                                              jnp.broadcast_to(branch_M, (R, G * N))], axis=1)}


def response_slots(P: int, N: int, G: int) -> np.ndarray:
    """(G N,) slots of the grouped row whose hidden states predict each response token."""
    i = np.arange(N)
    return np.concatenate([np.where(i == 0, P - 1, P + g * N + i - 1) for g in range(G)])


def response_hidden(hidden_RTD, P: int, N: int, G: int):
    """The grouped forward's hidden states -> (B, N, D) in row order."""
    R, _, D = hidden_RTD.shape
    if G == 1:
        return hidden_RTD[:, P - 1:P - 1 + N]
    picked = jnp.take(hidden_RTD, jnp.asarray(response_slots(P, N, G)), axis=1)
    return picked.reshape(R * G, N, D)


def layout(prompt_BP, prompt_mask_BP, response_BN, response_mask_BN, G: int) -> dict:
    if G == 1:
        return per_row(prompt_BP, prompt_mask_BP, response_BN, response_mask_BN)
    return grouped(prompt_BP, prompt_mask_BP, response_BN, response_mask_BN, G)


def forward_flops(cfg: ModelConfig, rows: int, T: int) -> float:
    """Forward FLOPs of `rows` rows of T tokens: the matmuls per token plus the full T x T
    attention scores and values (masked or not, the dense attention computes them)."""
    d, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    mm = 2 * (d * (q + 2 * kv) + q * d + 3 * d * cfg.intermediate_size)
    return cfg.num_layers * rows * T * (mm + 4 * T * q)


def group_size(cfg: ModelConfig, P: int, N: int, G: int, micro_rows: int) -> int:
    """G when the grouped layout serves the update exactly (every micro batch holds whole
    groups) and costs fewer FLOPs than G rows of their own; else 1 (per row)."""
    if G < 2 or micro_rows % G:
        return 1
    cheaper = forward_flops(cfg, 1, P + G * N) < forward_flops(cfg, G, P + N)
    return G if cheaper else 1


def minibatch_rows(groups: np.ndarray, G: int, grad_accum: int) -> np.ndarray:
    """Row indices of a minibatch made of whole `groups`, ordered so that the train step's
    strided micro batches (`step.micro_batches`: micro batch k takes rows k, k + A, ...) each
    hold whole groups, members consecutive."""
    per_micro = np.asarray(groups).reshape(grad_accum, -1)
    rows_AR = (per_micro[..., None] * G + np.arange(G)).reshape(grad_accum, -1)
    return rows_AR.T.reshape(-1)


def buckets(prompt_lengths, response_lengths, P: int, N: int) -> tuple[int, int]:
    """The batch's own prompt / response lengths, bucketed (`bucket_length`, so a run
    compiles a few shapes) and at most the rollout's P / N."""
    p = min(P, bucket_length(int(np.max(prompt_lengths))))
    n = min(N, bucket_length(max(int(np.max(response_lengths)), 1), minimum=8))
    return p, n


def trim(batch: dict, P2: int, N2: int) -> dict:
    """Cuts the left padding of the prompt keys (`_BP`) to P2 and the right padding of the
    response keys (`_BN`) to N2. Exact: the cut slots are padding in every row."""
    out = {}
    for k, x in batch.items():
        if k.endswith("_BP"):
            out[k] = x[:, x.shape[1] - P2:]
        elif k.endswith("_BN"):
            out[k] = x[:, :N2]
        else:
            out[k] = x
    return out
