"""Deterministic, resumable, per-process batch iterators over tokenized datasets.

Training stream. Example n of the stream comes from dataset i with probability w_i, drawn
with an RNG seeded by (seed, n); each dataset walks its own per-epoch permutation, seeded by
(seed, i, epoch), and starts a new epoch when it runs out. The whole position is therefore
(n, and per dataset (epoch, cursor)): a few integers that `state()` returns as JSON and
`restore()` takes back, after which the loader yields exactly the batches the original would
have. The state counts examples, not batches, so it stays valid if batch size, packing or
the number of processes change (the batches then differ, the example order does not).

Every process builds the same global batch and keeps rows [i * B / P, (i + 1) * B / P): the
build costs microseconds per row against a train step of seconds, and no process can drift.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np

from jaxalign.data.packing import (check_processes, empty_batch, greedy_rows, process_slice,
                                   write_row)
from jaxalign.data.sources import DataError
from jaxalign.data.tokenize import TokenizedSet

STATE_VERSION = 1


class MixtureStream:
    """An infinite, deterministic sequence of (dataset index, example index), with peek."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, shuffle: bool = True):
        if len(sizes) != len(weights) or not sizes:
            raise DataError("need one weight per dataset and at least one dataset")
        for i, n in enumerate(sizes):
            if n <= 0:
                raise DataError(f"training dataset {i} has no examples left to train on")
        self.sizes = [int(n) for n in sizes]
        w = np.asarray(weights, np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.seed, self.shuffle = int(seed), shuffle
        self.counter = 0
        self.cursors = [[0, 0] for _ in sizes]  # per dataset: [epoch, position in epoch]
        self._perm: dict[int, tuple[int, np.ndarray]] = {}
        self._peeked: tuple[int, int] | None = None

    def _choose(self, n: int) -> int:
        if len(self.sizes) == 1:
            return 0
        u = np.random.default_rng([self.seed, 0, n]).random()
        return min(int(np.searchsorted(self.cum, u, side="right")), len(self.sizes) - 1)

    def _order(self, i: int, epoch: int) -> np.ndarray:
        cached = self._perm.get(i)
        if cached is None or cached[0] != epoch:
            n = self.sizes[i]
            perm = (np.random.default_rng([self.seed, 1, i, epoch]).permutation(n)
                    if self.shuffle else np.arange(n))
            self._perm[i] = cached = (epoch, perm)
        return cached[1]

    def peek(self) -> tuple[int, int]:
        if self._peeked is None:
            i = self._choose(self.counter)
            epoch, pos = self.cursors[i]
            self._peeked = (i, int(self._order(i, epoch)[pos]))
        return self._peeked

    def advance(self) -> None:
        i, _ = self.peek()
        self._peeked = None
        self.counter += 1
        self.cursors[i][1] += 1
        if self.cursors[i][1] == self.sizes[i]:
            self.cursors[i] = [self.cursors[i][0] + 1, 0]

    def state(self) -> dict:
        return {"counter": self.counter, "cursors": [list(c) for c in self.cursors]}

    def restore(self, state: dict) -> None:
        self.counter = int(state["counter"])
        self.cursors = [[int(e), int(p)] for e, p in state["cursors"]]
        self._peeked = None


class TrainLoader:
    """Infinite iterator of training batches (dicts of numpy arrays, see `packing`) for this
    process: B / process_count rows of seq_len."""

    def __init__(self, datasets: Sequence[TokenizedSet], weights: Sequence[float] | None = None, *,
                 seq_len: int, batch_size: int, pack: bool, pad_id: int, seed: int = 0,
                 shuffle: bool = True, process_index: int = 0, process_count: int = 1):
        check_processes(batch_size, process_index, process_count)
        for d in datasets:
            if len(d) and d.lengths.max() > seq_len:
                raise DataError(f"{d.name}: an example of {d.lengths.max()} tokens exceeds "
                                f"seq_len {seq_len}; truncate or drop before loading")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in (weights if weights is not None else [1.0] * len(datasets))]
        self.seq_len, self.batch_size, self.pack, self.pad_id = seq_len, batch_size, pack, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.stream = MixtureStream([len(d) for d in datasets], self.weights, seed, shuffle)
        self.batches = 0
        self._check = {"seed": int(seed), "shuffle": bool(shuffle), "weights": self.weights,
                       "sizes": [len(d) for d in datasets],
                       "fingerprints": [d.fingerprint() for d in datasets]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def _next_row(self) -> list[tuple[np.ndarray, np.ndarray]]:
        segments, used = [], 0
        while True:
            i, j = self.stream.peek()
            ids, mask = self.datasets[i][j]
            if segments and (not self.pack or used + len(ids) > self.seq_len):
                return segments
            segments.append((ids, mask))
            used += len(ids)
            self.stream.advance()

    def next_global(self) -> dict[str, np.ndarray]:
        """The whole batch (all processes' rows); advances the loader."""
        batch = empty_batch(self.batch_size, self.seq_len, self.pad_id)
        for r in range(self.batch_size):
            write_row(batch, r, self._next_row())
        self.batches += 1
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        return process_slice(self.next_global(), self.process_index, self.process_count)

    def steps_for_epochs(self, epochs: float) -> int:
        """Batches that take `epochs` passes over all training examples (the datasets
        together, whatever their weights), counted from the start. Packed rows hold a varying
        number of examples, so they are counted by packing a pass (no arrays are built)."""
        target = math.ceil(epochs * sum(self.stream.sizes))
        if not self.pack:
            return max(1, math.ceil(target / self.batch_size))
        saved = self.stream.state()
        self.stream.restore({"counter": 0, "cursors": [[0, 0] for _ in self.stream.sizes]})
        rows = 0
        try:
            while self.stream.counter < target:
                self._next_row()
                rows += 1
        finally:
            self.stream.restore(saved)
        return max(1, math.ceil(rows / self.batch_size))

    @property
    def epochs(self) -> list[float]:
        """Fractional epochs consumed per dataset (for logging)."""
        return [e + p / n for (e, p), n in zip(self.stream.cursors, self.stream.sizes)]

    def state(self) -> dict:
        """JSON-serialisable position; `restore` on a loader over the same data resumes exactly."""
        return {"version": STATE_VERSION, "batches": self.batches,
                "examples": self.stream.counter, **self.stream.state(), "check": self._check}

    def restore(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        for key, ours in self._check.items():
            theirs = state["check"].get(key)
            if theirs != ours:
                raise DataError(f"loader state does not match this data: {key} was {theirs} when "
                                f"saved and is {ours} now; the datasets, their tokenization or "
                                f"data.seed changed, so the run cannot resume the same order")
        self.stream.restore(state)
        self.batches = int(state["batches"])


class EvalLoader:
    """A fixed pass over an eval set, in order, never shuffled. The last batch is filled with
    fully masked rows so every batch has the same shape. Iterable any number of times."""

    def __init__(self, dataset: TokenizedSet, *, seq_len: int, batch_size: int, pack: bool,
                 pad_id: int, process_index: int = 0, process_count: int = 1):
        check_processes(batch_size, process_index, process_count)
        if len(dataset) and dataset.lengths.max() > seq_len:
            raise DataError(f"{dataset.name}: an example exceeds seq_len {seq_len}")
        self.dataset = dataset
        self.seq_len, self.batch_size, self.pad_id = seq_len, batch_size, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.rows = greedy_rows(dataset.lengths.tolist(), seq_len, pack)
        self.num_batches = math.ceil(len(self.rows) / batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def global_batches(self) -> Iterator[dict[str, np.ndarray]]:
        for b in range(self.num_batches):
            batch = empty_batch(self.batch_size, self.seq_len, self.pad_id)
            for r, row in enumerate(self.rows[b * self.batch_size:(b + 1) * self.batch_size]):
                write_row(batch, r, [self.dataset[i] for i in row])
            yield batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.global_batches():
            yield process_slice(batch, self.process_index, self.process_count)
