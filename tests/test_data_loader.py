"""Packing, mixing, determinism, exact resume, per-process slices and the eval loader.

Synthetic tokenized sets (no tokenizer, no jax): example k of set d has ids
[1000 * d + k, ...] so every batch position can be traced back to its example.
"""

import json
from collections import Counter

import numpy as np
import pytest

from jaxalign.data import (BATCH_KEYS, DataConfig, DataError, EvalLoader, MixtureStream,
                           TokenizedSet, TrainLoader, build_sft_data)

PAD = 2


def make_set(d, n, rng, lo=3, hi=12, name=None):
    """n examples with random lengths; mask 0 on a 'prompt' prefix, 1 after."""
    pairs = []
    for k in range(n):
        length = int(rng.integers(lo, hi + 1))
        ids = np.arange(length, dtype=np.int32) + 10_000 * (d + 1) + 100 * k
        prompt = int(rng.integers(1, length))
        mask = (np.arange(length) >= prompt).astype(np.uint8)
        pairs.append((ids, mask))
    return TokenizedSet.from_pairs(name or f"set{d}", pairs)


@pytest.fixture
def sets():
    rng = np.random.default_rng(0)
    return [make_set(0, 13, rng), make_set(1, 7, rng)]


def loader(sets, weights=None, **kw):
    args = dict(seq_len=32, batch_size=4, pack=True, pad_id=PAD, seed=3)
    args.update(kw)
    return TrainLoader(sets, weights, **args)


def segments(batch):
    """Per row, per segment: (tokens, targets, loss_mask) arrays; checks the contract on the way."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        pad = seg == 0
        assert (batch["loss_mask"][r][pad] == 0).all() and (batch["positions"][r][pad] == 0).all()
        assert (batch["tokens"][r][pad] == PAD).all()
        if pad.any():  # padding only at the end of a row
            assert pad[np.argmax(pad):].all()
        for s in range(1, seg.max() + 1):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()
            assert batch["positions"][r][idx].tolist() == list(range(len(idx)))
            out.append(tuple(batch[k][r][idx] for k in ("tokens", "targets", "loss_mask")))
    return out


def test_packed_row_contents():
    a = (np.array([5, 6, 7, 8], np.int32), np.array([0, 0, 1, 1], np.uint8))
    b = (np.array([9, 10, 11], np.int32), np.array([0, 1, 1], np.uint8))
    c = (np.array([12, 13, 14, 15, 16], np.int32), np.array([0, 0, 0, 1, 1], np.uint8))
    ld = TrainLoader([TokenizedSet.from_pairs("x", [a, b, c])], seq_len=8, batch_size=2, pack=True,
                     pad_id=PAD, shuffle=False)
    batch = next(ld)
    assert set(batch) == set(BATCH_KEYS)
    assert {k: v.dtype.name for k, v in batch.items()} == {
        "tokens": "int32", "targets": "int32", "loss_mask": "float32", "segment_ids": "int32",
        "positions": "int32"}
    # row 0: a (4) + b (3) fit in 8; c (5) does not -> row 1.
    assert batch["tokens"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, PAD]
    assert batch["targets"][0].tolist() == [6, 7, 8, PAD, 10, 11, PAD, PAD]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
    assert batch["tokens"][1].tolist() == [12, 13, 14, 15, 16, PAD, PAD, PAD]
    assert batch["targets"][1].tolist() == [13, 14, 15, 16, PAD, PAD, PAD, PAD]
    assert batch["loss_mask"][1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert batch["segment_ids"][1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    padded = next(TrainLoader([TokenizedSet.from_pairs("x", [a, b, c])], seq_len=8, batch_size=3,
                              pack=False, pad_id=PAD, shuffle=False))
    assert padded["segment_ids"].max() == 1
    assert padded["tokens"][1].tolist() == [9, 10, 11] + [PAD] * 5


def test_packed_equals_unpacked(sets):
    packed = loader(sets, pack=True, batch_size=4)
    segs_p = [s for _ in range(10) for s in segments(next(packed))]
    n = packed.stream.counter
    assert len(segs_p) == n and n > 40  # several epochs of both sets, both orders drawn
    unpacked = loader(sets, pack=False, batch_size=1)
    segs_u = [s for _ in range(n) for s in segments(next(unpacked))]
    # The same examples in the same order, with identical (token, target, mask) per position.
    assert len(segs_u) == n
    for p, u in zip(segs_p, segs_u):
        for x, y in zip(p, u):
            np.testing.assert_array_equal(x, y)
    triples = lambda ss: Counter((int(t), int(g), float(m)) for s in ss for t, g, m in zip(*s))
    assert triples(segs_p) == triples(segs_u)
    # Packing used fewer rows for the same examples and the same trained targets.
    assert 10 * 4 < n


def test_segment_targets_match_examples(sets):
    ld = loader(sets, pack=True)
    for _ in range(3):
        for toks, tgts, mask in segments(next(ld)):
            d, k = int(toks[0]) // 10_000 - 1, (int(toks[0]) % 10_000) // 100
            ids, m = sets[d][k]
            np.testing.assert_array_equal(toks, ids)
            np.testing.assert_array_equal(tgts[:-1], ids[1:])
            np.testing.assert_array_equal(mask, np.append(m[1:], 0))


def test_mixing_matches_weights_and_each_epoch_is_a_permutation():
    stream = MixtureStream([50, 30], [0.7, 0.3], seed=11)
    draws = []
    for _ in range(6000):
        draws.append(stream.peek())
        stream.advance()
    frac = np.mean([i == 0 for i, _ in draws])
    assert abs(frac - 0.7) < 0.02, frac
    for i, n in [(0, 50), (1, 30)]:
        seq = [j for d, j in draws if d == i]
        for e in range(len(seq) // n):
            assert sorted(seq[e * n:(e + 1) * n]) == list(range(n))
        assert seq[:n] != seq[n:2 * n]  # a new permutation each epoch


def test_same_seed_same_batches_other_seed_differs(sets):
    a, b, c = loader(sets), loader(sets), loader(sets, seed=4)
    for _ in range(5):
        ba, bb, bc = next(a), next(b), next(c)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(ba[k], bb[k])
    assert not np.array_equal(ba["tokens"], bc["tokens"])


@pytest.mark.parametrize("pack", [True, False])
def test_exact_resume(sets, pack):
    original = loader(sets, pack=pack, weights=[0.6, 0.4])
    for _ in range(7):  # past several epoch boundaries of the 7-example set
        next(original)
    state = json.loads(json.dumps(original.state()))
    fresh = loader(sets, pack=pack, weights=[0.6, 0.4])
    fresh.restore(state)
    assert fresh.state() == original.state()
    for _ in range(6):
        x, y = next(original), next(fresh)
        for k in BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])


def test_restore_refuses_other_data(sets):
    state = loader(sets).state()
    rng = np.random.default_rng(1)
    with pytest.raises(DataError, match="loader state does not match this data: sizes"):
        loader([sets[0], make_set(1, 8, rng)]).restore(state)
    with pytest.raises(DataError, match="loader state does not match this data: seed was 3"):
        loader(sets, seed=5).restore(state)


def test_process_slices_concatenate_to_global_batch(sets):
    whole = loader(sets, batch_size=8)
    parts = [loader(sets, batch_size=8, process_index=i, process_count=4) for i in range(4)]
    for _ in range(3):
        g = next(whole)
        ps = [next(p) for p in parts]
        for k in BATCH_KEYS:
            assert ps[0][k].shape == (2, 32)
            np.testing.assert_array_equal(np.concatenate([p[k] for p in ps]), g[k])


def test_batch_not_divisible_by_processes(sets):
    with pytest.raises(DataError, match="batch size 6 is not divisible by the number of processes 4"):
        loader(sets, batch_size=6, process_count=4)


def test_eval_loader_fixed_pass_with_masked_filler_rows(sets):
    ev = EvalLoader(sets[0], seq_len=32, batch_size=4, pack=False, pad_id=PAD)
    batches = list(ev)
    assert len(batches) == len(ev) == 4  # 13 examples -> 3 full batches + 1 row and 3 fillers
    first = [int(b["tokens"][r][0]) for b in batches for r in range(4) if b["segment_ids"][r][0]]
    assert first == [int(sets[0][k][0][0]) for k in range(13)]  # in order, not shuffled
    last = batches[-1]
    assert (last["segment_ids"][1:] == 0).all() and (last["loss_mask"][1:] == 0).all()
    assert all(b["tokens"].shape == (4, 32) for b in batches)
    again = list(ev)
    for x, y in zip(batches, again):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    packed = EvalLoader(sets[0], seq_len=32, batch_size=2, pack=True, pad_id=PAD)
    segs = [s for b in packed for s in segments(b)]
    assert [int(s[0][0]) for s in segs] == first
    halves = [EvalLoader(sets[0], seq_len=32, batch_size=4, pack=False, pad_id=PAD, process_index=i,
                         process_count=2) for i in range(2)]
    for g, a, b in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([a["tokens"], b["tokens"]]), g["tokens"])


def test_example_longer_than_row_is_refused(sets):
    with pytest.raises(DataError, match="set0: an example of 12 tokens exceeds seq_len 8"):
        loader(sets, seq_len=8)


def test_build_with_two_weighted_datasets_packed(tmp_path):
    """End to end with a tiny fake tokenizer: mixing, eval set, packing, resume via state."""
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": "a" * (i % 5 + 1)}) + "\n" for i in range(20)))
    b.write_text("".join(json.dumps({"text": "b" * (i % 3 + 1)}) + "\n" for i in range(10)))
    cfg = DataConfig(train=[{"path": str(a), "weight": 0.7}, {"path": str(b), "weight": 0.3}],
                     eval={"path": str(b), "max_examples": 5}, seq_len=16, pack=True, seed=1,
                     cache_dir=str(tmp_path / "cache"))
    data = build_sft_data(cfg, CharTokenizer(), batch_size=4)
    batches = [next(data.train) for _ in range(50)]
    seen = Counter(chr(t) for bt in batches for t in bt["tokens"][bt["segment_ids"] > 0] if t > 3)
    frac_a = seen["a"] / (seen["a"] + seen["b"])  # token share: a examples are longer (mean 3 vs 2)
    expect = 0.7 * 3 / (0.7 * 3 + 0.3 * 2)
    assert abs(frac_a - expect) < 0.05, (frac_a, expect)
    assert data.eval is not None and len(data.eval) == 1  # 5 short examples pack into 2 rows
    state = data.train.state()
    again = build_sft_data(cfg, CharTokenizer(), batch_size=4)
    again.train.restore(state)
    np.testing.assert_array_equal(next(again.train)["tokens"], next(data.train)["tokens"])


class CharTokenizer:
    """One token per character (id = code point), eos 2, no chat template, no BOS."""

    eos_token_id = 2
    pad_token_id = 2
    chat_template = None

    def __call__(self, texts, add_special_tokens=True, **kw):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


@pytest.mark.parametrize("pack", [False, True])
def test_steps_for_epochs_consume_the_epochs(sets, pack):
    """train.epochs -> steps: after that many batches the stream has taken at least `epochs`
    passes over all examples, and one batch fewer had not."""
    total = sum(len(s) for s in sets)
    for epochs in (1, 2.5):
        ld = loader(sets, pack=pack)
        steps = ld.steps_for_epochs(epochs)
        assert ld.stream.counter == 0  # counting does not move the loader
        for _ in range(steps - 1):
            next(ld)
        assert ld.stream.counter < epochs * total
        next(ld)
        assert ld.stream.counter >= epochs * total
        if not pack:
            assert steps == -(-int(epochs * total) // ld.batch_size)


def test_train_config_steps_or_epochs():
    from jaxalign.config import ConfigError, TrainConfig
    assert TrainConfig(epochs=3, batch_size=4).steps is None
    for kw in ({}, {"steps": 2, "epochs": 1.0}):
        with pytest.raises(ConfigError, match="exactly one of train.steps and train.epochs"):
            TrainConfig(batch_size=4, **kw)
