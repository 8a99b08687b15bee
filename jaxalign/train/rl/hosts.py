"""A rollout's rows across processes (hosts): each process decodes and scores only the rows
its devices hold; the per-row figures the rest of the iteration needs on the host (raw
scores, lengths, EOS flags, entropy sums, samples) are then exchanged once, so that every
process holds the same global arrays and computes the same normalisation, metrics and
samples as a single process would on the whole rollout.

Only host values cross here (a few floats per row); the advantages and the updates run on
the global device arrays inside the jitted programs, where a GRPO / RLOO group whose rows
sit on two processes is reduced by XLA's own collectives.

A reward function that fails on one process fails the iteration on every process (the
error travels with the figures), so no process waits for a peer that has stopped.
"""

from __future__ import annotations

import numpy as np

from jaxalign import distributed

# Rollout outputs each process reads back for its own rows; the policy forward's two only when
# the rollout ran one (else the update's first step reports them, `objectives.first_forward`).
HOST_KEYS = ("response_BN", "lengths_B", "mask_BN", "sampler_logp_BN", "rm_score_B")
FORWARD_KEYS = ("entropy_BN", "old_logp_BN")


def row_figures(host: dict, eos: np.ndarray, raw: np.ndarray, parts: dict) -> dict:
    """This process's per-row figures: `host` its rows of the rollout (HOST_KEYS, and
    FORWARD_KEYS when the rollout has them), `raw` and `parts` (source -> per-row score) from
    the rewarder, `eos` the EOS flags."""
    mask = host["mask_BN"].astype(bool)
    out = {"raw": raw, "lengths": host["lengths_B"], "eos": eos, "tokens": mask.sum(1),
           **{f"part:{k}": v for k, v in parts.items()}}
    if "old_logp_BN" in host:
        gap = np.where(mask, np.abs(host["sampler_logp_BN"] - host["old_logp_BN"]), 0.0)
        out.update(entropy_sum=np.where(mask, host["entropy_BN"], 0.0).sum(1, dtype=np.float64),
                   logprob_gap=gap.max(1))
    return out


def exchange(rows: slice, total: int, figures: dict | None, extra: dict | None = None,
             error: str | None = None) -> tuple[dict[str, np.ndarray], list[dict], str | None]:
    """Every process's per-row `figures` placed at its rows of a `total`-row rollout, the
    `extra` objects of every process (process order), and the first error any process had.
    Rows that several processes hold (a batch replicated across them) come from the first."""
    mine = {"rows": [rows.start, rows.stop], "error": error, "extra": extra,
            "figures": None if figures is None else
            {k: np.asarray(v).tolist() for k, v in figures.items()}}
    every = distributed.allgather_json(mine)
    errors = [p["error"] for p in every if p["error"]]
    if errors:
        return {}, [], errors[0]
    out: dict[str, np.ndarray] = {}
    for p in reversed(every):   # the lowest process writes last: its copy wins
        a, b = p["rows"]
        for k, v in p["figures"].items():
            v = np.asarray(v)
            if k not in out:
                out[k] = np.zeros((total,) + v.shape[1:], v.dtype)
            out[k][a:b] = v
    return out, [p["extra"] for p in every], None


def rollout_metrics(g: dict[str, np.ndarray]) -> dict[str, float]:
    """The rollout's host metrics from the global per-row figures."""
    tokens = max(float(g["tokens"].sum()), 1.0)
    raw = g["raw"][~np.isnan(g["raw"])]   # NaN: a completion no reward source scored
    out = {"reward_mean": float(raw.mean()) if raw.size else float("nan"),
           "reward_std": float(raw.std()) if raw.size else float("nan"),
           "response_length": float(g["lengths"].mean()), "eos_rate": float(g["eos"].mean())}
    if "entropy_sum" in g:   # else the update's first step reports them
        out.update(entropy=float(g["entropy_sum"].sum() / tokens),
                   logprob_gap=float(g["logprob_gap"].max()))
    # a source's mean over the completions it scored (its None: NaN, left out, as TRL's nanmean)
    out.update({k[len("part:"):]: float(np.nanmean(v)) if (~np.isnan(v)).any() else float("nan")
                for k, v in g.items() if k.startswith("part:")})
    return out


def finite_rows(g: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """-> (figures, keep): rows whose raw score is NaN / inf (a reward model's score; reward
    functions are refused per call) are dropped: `keep` False there, and their scores (and
    per-source parts) replaced by the kept rows' mean, so that nothing downstream (the
    running moments, the KL controller, the metrics, the checkpoint) sees a non-finite
    value. With no finite row at all, keep is all False and the caller refuses the
    iteration."""
    keep = np.isfinite(g["raw"])
    if keep.all() or not keep.any():
        return g, keep
    out = dict(g)
    for k, v in g.items():
        if k == "raw" or k.startswith("part:"):
            v = np.asarray(v, np.float64)
            ok = keep & np.isfinite(v)
            out[k] = np.where(ok, v, v[ok].mean() if ok.any() else 0.0)
    return out, keep
