"""Placing tokenized examples into fixed-size rows: the batch dict contract.

A batch is a dict of numpy arrays, B rows of T = seq_len positions:

  tokens       (B, T) int32    input token ids; pad_id at padding
  targets      (B, T) int32    the next token within the same example; pad_id where there is none
  loss_mask    (B, T) float32  1 where targets[b, t] is a trained token; 0 at padding and at
                               every example's last position (its target would be the next example)
  segment_ids  (B, T) int32    0 = padding, 1, 2, ... for the examples packed in the row
  positions    (B, T) int32    0, 1, ... restarting at every example; 0 at padding

An example of L tokens fills L positions and gives L - 1 predictions, so an example of exactly
T tokens fits a row. Attention must be causal within a segment (segment_ids equal and > 0).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def empty_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """B fully masked rows: every position padding."""
    shape = (batch_size, seq_len)
    return {
        "tokens": np.full(shape, pad_id, np.int32),
        "targets": np.full(shape, pad_id, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }


def write_row(batch: dict[str, np.ndarray], r: int,
              segments: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Writes examples (ids, per-token trained mask) one after another into row r of `batch`."""
    seq_len = batch["tokens"].shape[1]
    pos = 0
    for seg, (ids, mask) in enumerate(segments, start=1):
        n = len(ids)
        if pos + n > seq_len:
            raise ValueError(f"segments of {pos + n} tokens do not fit a row of {seq_len}")
        end = pos + n
        batch["tokens"][r, pos:end] = ids
        batch["targets"][r, pos:end - 1] = ids[1:]
        batch["loss_mask"][r, pos:end - 1] = mask[1:]
        batch["segment_ids"][r, pos:end] = seg
        batch["positions"][r, pos:end] = np.arange(n, dtype=np.int32)
        pos = end


def greedy_rows(lengths: Sequence[int], seq_len: int, pack: bool) -> list[list[int]]:
    """Example indices per row, in order: one per row, or greedily packed (a row takes the
    following examples until the next does not fit)."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    rows, row, used = [], [], 0
    for i, n in enumerate(lengths):
        if row and used + n > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def process_slice(batch: dict[str, np.ndarray], process_index: int, process_count: int
                  ) -> dict[str, np.ndarray]:
    """Rows [i * B / P, (i + 1) * B / P) of a global batch: this process's share."""
    b = batch["tokens"].shape[0]
    per = b // process_count
    return {k: v[process_index * per:(process_index + 1) * per] for k, v in batch.items()}


def check_processes(batch_size: int, process_index: int, process_count: int) -> None:
    from jaxalign.data.sources import DataError

    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise DataError(f"batch size {batch_size} is not divisible by the number of processes "
                        f"{process_count}; each process must get the same number of rows")
