"""Shared-prefix layouts: rows that begin with the same prompt, written as one row
[prompt | branch 1 | branch 2 | ...] so the prompt's tokens go through the model once.

The model reads such a row through `branch_ids` (`Llama.__call__`): a token of branch g > 0
attends to the prompt (branch 0) and to the earlier tokens of branch g only, and each
branch's positions continue from the prompt's end, so every branch sees exactly what it
would see in a row of its own. What a branch's targets need is then a gather: the target
that follows slot t of a branch's own row is predicted by slot `t` while t is inside the
prompt (the prompt's last slot predicts every branch's first token) and by that token's slot
in the shared row after it. `logp_index` lists those slots for the loss positions only, so
the LM head never runs over the prompt (or any position without a loss).

Numpy only, host side, for any number of branches (pairs: 2; groups of G responses: G).

Layout batch (from rows of S = 1 (shared) or G (one row per branch, the unshared layout)):
  tokens, positions, segment_ids, branch_ids   (B, S, L) int32; branch 0 = prompt (and padding)
  logp_index   (B, M) int32   slot in the B-th item's S * L flattened slots that predicts...
  logp_target  (B, M) int32   ...this target token
  logp_branch  (B, M) int32   whose loss it is: 1..G, 0 for a filler position (no loss)
plus every (B,) key of the input batch unchanged (prompt_len, pair_mask, margin, label, ...).
L and M are the batch's longest row / loss count rounded up to `BUCKET` (the unshared layout
keeps its rows' length), so similar batches share one compiled step.
"""

from __future__ import annotations

import numpy as np

from jaxalign.data.packing import process_slice

BUCKET = 64          # row lengths and loss counts are padded to a multiple of this
ROW_KEYS = ("tokens", "positions", "segment_ids", "branch_ids")
GATHER_KEYS = ("logp_index", "logp_target", "logp_branch")


def bucket(n: int, quantum: int = BUCKET) -> int:
    return max(quantum, -(-n // quantum) * quantum)


def _branch_gather(targets_T, mask_T, g: int, base: int, p: int):
    """(slots, targets, branch g) of the loss positions of one branch's own row: own slot
    t < p is the shared prompt's slot t, own slot t >= p sits at base + t - p."""
    t = np.flatnonzero(mask_T > 0)
    slots = np.where(t < p, t, base + t - p)
    return slots.astype(np.int32), targets_T[t], np.full(len(t), g, np.int32)


def branch_layout(batch: dict[str, np.ndarray], *, share: bool, pad_id: int,
                  row_len: int | None = None, gather_len: int | None = None
                  ) -> dict[str, np.ndarray]:
    """(B, G, T) rows that share their first `batch['prompt_len']` tokens (SFT row keys:
    tokens, targets, loss_mask, segment_ids, positions; one sequence per row from slot 0) ->
    the layout batch above: one row [prompt | branch 1 | ... | branch G] per item when
    `share`, else the G rows as they are, row g all branch g + 1. `row_len` / `gather_len`
    fix L / M (e.g. the worst case, for planning) instead of bucketing this batch's."""
    B, G, T = batch["tokens"].shape
    n_BG = (batch["segment_ids"] > 0).sum(axis=-1)          # real tokens per row
    p_B = np.minimum(batch["prompt_len"].astype(np.int64), n_BG.min(axis=1))
    items = []
    for b in range(B):
        p = int(p_B[b]) if share else 0
        rows, gathers, offset = [], [], 0
        for g in range(G):
            n = int(n_BG[b, g])
            lo = p if g else 0                              # the prompt is written once
            rows.append((batch["tokens"][b, g, lo:n], batch["positions"][b, g, lo:n],
                         np.where(np.arange(lo, n) < p, 0, g + 1)))
            base = (p if g == 0 else offset) if share else g * T
            gathers.append(_branch_gather(batch["targets"][b, g], batch["loss_mask"][b, g],
                                          g + 1, base, p))
            offset += n - lo
        items.append((rows, gathers, offset))
    if share:
        L = row_len or bucket(max(x[2] for x in items))
        S = 1
    else:
        L, S = T, G
    M = gather_len or bucket(max(sum(len(s) for s, _, _ in x[1]) for x in items))
    out = {"tokens": np.full((B, S, L), pad_id, np.int32),
           "positions": np.zeros((B, S, L), np.int32),
           "segment_ids": np.zeros((B, S, L), np.int32),
           "branch_ids": np.zeros((B, S, L), np.int32),
           "logp_index": np.zeros((B, M), np.int32),
           "logp_target": np.full((B, M), pad_id, np.int32),
           "logp_branch": np.zeros((B, M), np.int32)}
    for b, (rows, gathers, _) in enumerate(items):
        at = 0
        for g, (tok, pos, br) in enumerate(rows):
            s, at = (0, at) if share else (g, 0)
            n = len(tok)
            out["tokens"][b, s, at:at + n] = tok
            out["positions"][b, s, at:at + n] = pos
            out["segment_ids"][b, s, at:at + n] = 1
            out["branch_ids"][b, s, at:at + n] = br
            at += n
        slots = np.concatenate([x[0] for x in gathers])
        m = len(slots)
        out["logp_index"][b, :m] = slots
        out["logp_target"][b, :m] = np.concatenate([x[1] for x in gathers])
        out["logp_branch"][b, :m] = np.concatenate([x[2] for x in gathers])
    for k, v in batch.items():
        if k not in out and v.ndim == 1:
            out[k] = v
    return out


def _process_layout(batch, loader, layout) -> dict[str, np.ndarray]:
    """The layout of the whole (all processes') batch, then this process's rows: every
    process of a multi-process run then pads to the same L and M, so all of them run the
    same program (a per-process bucket would hand the collectives different sizes)."""
    return process_slice(branch_layout(batch, **layout), loader.process_index,
                         loader.process_count)


class LayoutLoader:
    """A train loader whose batches come out through `branch_layout(batch, **layout)`; its
    position (state / restore, the resume contract) and everything else are the wrapped
    loader's, so resuming is exactly as without the layout."""

    def __init__(self, loader, **layout):
        self.loader, self.layout = loader, layout

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return _process_layout(self.loader.next_global(), self.loader, self.layout)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def laid_out(data, *, share: bool, pad_id: int):
    """(train loader, eval batches factory or None) of a `PreferenceData` (pairs or KTO's
    unpaired rows) in the branch layout: the task's `train_data` / `eval_data`."""
    train = LayoutLoader(data.train, share=share, pad_id=pad_id)
    if data.eval is None:
        return train, None
    layout = {"share": share, "pad_id": pad_id}
    return train, lambda: (_process_layout(b, data.eval, layout)
                           for b in data.eval.global_batches())
