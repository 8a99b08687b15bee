"""The data stage (`jaxalign prepare`): empty and exact-duplicate rows, MinHash near
duplicates (planted edited copies above and below the threshold; the true Jaccard of each
plant is computed here with plain set arithmetic), weights, the eval split, the table."""

import json
import random

import pytest

from jaxalign.config import ConfigError, from_dict
from jaxalign.data.prepare import PrepareConfig, run_prepare
from jaxalign.data.sources import DataError

VOCAB = [f"w{i}" for i in range(3000)]


def _doc(rng, n=300):
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def _edit(rng, text, k):
    """Replaces k words at separate positions by words no document uses."""
    words = text.split()
    for j, pos in enumerate(rng.sample(range(0, len(words), 6), k)):
        words[pos] = f"edit{j}x{rng.randrange(10**9)}"
    return " ".join(words)


def _true_jaccard(a, b, size):
    def sh(t):
        w = t.lower().split()
        return {" ".join(w[i:i + size]) for i in range(len(w) - size + 1)}
    x, y = sh(a), sh(b)
    return len(x & y) / len(x | y)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_planted_near_duplicates_above_threshold_removed_exactly(tmp_path):
    rng = random.Random(0)
    originals = [_doc(rng) for _ in range(60)]
    rows = [{"text": t, "id": i} for i, t in enumerate(originals)]
    above, below = [], []
    for i in range(0, 60, 2):  # one edited copy of every other document
        close = i % 4 == 0
        copy = _edit(rng, originals[i], 1 if close else 12)
        j = _true_jaccard(originals[i], copy, 5)
        (above if close else below).append(len(rows))
        assert (j >= 0.95) if close else (j <= 0.75), j  # clear of the threshold both ways
        rows.append({"text": copy, "id": len(rows)})
    rows.append({"text": "   ", "id": len(rows)})                 # empty
    rows.append({"text": originals[5].upper() + "  ", "id": len(rows)})  # exact (case, spaces)
    _write(tmp_path / "a.jsonl", rows)
    cfg = from_dict(PrepareConfig, {
        "out_dir": str(tmp_path / "out"), "dedup": {"shingle_size": 5, "threshold": 0.9},
        "sets": {"docs": {"sources": [str(tmp_path / "a.jsonl")], "text_fields": ["text"]}}})
    totals = run_prepare(cfg)
    kept = {json.loads(l)["id"] for l in (tmp_path / "out/docs/train.jsonl").read_text().splitlines()}
    dropped = set(range(len(rows))) - kept
    assert dropped == set(above) | {len(rows) - 2, len(rows) - 1}
    assert set(below) <= kept
    assert totals["near_duplicate"] == len(above) and totals["empty"] == 1
    assert totals["exact_duplicate"] == 1 and totals["kept"] == len(rows) - len(above) - 2
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    assert stats[0]["near_duplicate"] == len(above)
    md = (tmp_path / "out/stats.md").read_text()
    assert "near_duplicate" in md and f"| {len(above)} |" in md


def test_mixing_weights_split_and_cross_source_duplicates(tmp_path):
    a = [{"prompt": f"question {i} about apples", "answer": str(i)} for i in range(40)]
    b = [{"prompt": f"query {i} on pears and plums", "answer": str(i)} for i in range(20)]
    b.append(dict(a[3]))  # a duplicate across sources: the earlier source keeps it
    _write(tmp_path / "a.jsonl", a)
    _write(tmp_path / "b.jsonl", b)
    cfg = from_dict(PrepareConfig, {
        "out_dir": str(tmp_path / "out"), "eval_fraction": 0.1, "seed": 3,
        "sets": {"qa": {"sources": [{"path": str(tmp_path / "a.jsonl"), "weight": 0.5},
                                    {"path": str(tmp_path / "b.jsonl"), "weight": 2}]}}})
    run_prepare(cfg)
    train = [json.loads(l) for l in (tmp_path / "out/qa/train.jsonl").read_text().splitlines()]
    ev = [json.loads(l) for l in (tmp_path / "out/qa/eval.jsonl").read_text().splitlines()]
    stats = json.loads((tmp_path / "out/stats.json").read_text())
    assert [s["exact_duplicate"] for s in stats] == [0, 1]
    assert [s["eval"] for s in stats] == [4, 2]
    assert [s["train"] for s in stats] == [18, 36]          # 36 * 0.5, 18 * 2
    assert len(train) == 54 and len(ev) == 6
    from_a = [r for r in train if "apples" in r["prompt"]]
    from_b = [r for r in train if "pears" in r["prompt"]]
    assert len(from_a) == 18 and len({r["answer"] for r in from_a}) == 18
    assert len(from_b) == 36 and len({r["answer"] for r in from_b}) == 18  # each twice
    held = {r["prompt"] for r in ev}
    assert not held & {r["prompt"] for r in train}          # no eval row leaks into train
    assert train != sorted(train, key=lambda r: r["prompt"])  # shuffled together


def test_bad_config_and_data_named(tmp_path):
    with pytest.raises(ConfigError, match="dedup.threshold"):
        from_dict(PrepareConfig, {"out_dir": "x", "sets": {"a": ["f.jsonl"]}, "dedup": {"threshold": 0}})
    with pytest.raises(ConfigError, match="sets"):
        from_dict(PrepareConfig, {"out_dir": "x", "sets": {}})
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    cfg = from_dict(PrepareConfig, {"out_dir": str(tmp_path / "o"),
                                    "sets": {"a": [str(tmp_path / "bad.jsonl")]}})
    with pytest.raises(DataError, match="bad.jsonl: line 2"):
        run_prepare(cfg)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_streams_rows_instead_of_holding_them(tmp_path):
    """Peak Python memory of the stage (exact dedup, split, shuffle) on 20000 rows stays a
    fraction of what the rows take as dicts: it holds offsets and digests, not rows."""
    import tracemalloc
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(20000):
            f.write(json.dumps({"prompt": f"question {i} " + "lorem ipsum " * 10,
                                "answer": str(i), "meta": {"a": [1, 2, 3]}}) + "\n")
    _write(tmp_path / "warm.jsonl", [{"text": "a b"}, {"text": "c d"}])  # imports happen here
    run_prepare(from_dict(PrepareConfig, {"out_dir": str(tmp_path / "w"),
                                          "sets": {"a": [str(tmp_path / "warm.jsonl")]}}))
    tracemalloc.start()
    rows = [json.loads(line) for line in open(big)]
    as_dicts = tracemalloc.get_traced_memory()[1]
    del rows
    tracemalloc.stop()
    tracemalloc.start()
    run_prepare(from_dict(PrepareConfig, {"out_dir": str(tmp_path / "o"), "eval_fraction": 0.1,
                                          "dedup": {"near": False}, "sets": {"a": [str(big)]}}))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < as_dicts / 3, (peak, as_dicts)
    assert sum(1 for _ in open(tmp_path / "o/a/train.jsonl")) == 18000


def _one_word_copies(n_docs, seed=7):
    """n_docs distinct 200-word documents, then each with one word replaced: with 5-word
    shingles that is J = 191 / 201 = 0.950 (checked per pair with plain sets)."""
    rng = random.Random(seed)
    originals = [_doc(rng, 200) for _ in range(n_docs)]
    rows = [{"text": t, "id": i} for i, t in enumerate(originals)]
    for i, t in enumerate(originals):
        words = t.split()
        words[rng.randrange(5, 195)] = f"edit{rng.randrange(10**9)}"   # away from the ends
        copy = " ".join(words)
        assert 0.949 <= _true_jaccard(t, copy, 5) <= 0.951
        rows.append({"text": copy, "id": n_docs + i})
    return rows


def test_near_duplicates_at_jaccard_095_removed_at_99_percent(tmp_path):
    """400 planted pairs at J = 0.95 with dedup.threshold 0.9: >= 99% of the copies removed,
    every distinct document kept, stats.md counting candidates and verified removals. Bands
    tuned for the threshold itself (candidate_threshold 0.9) miss many: the test can fail."""
    n = 400
    rows = _one_word_copies(n)
    _write(tmp_path / "a.jsonl", rows)

    def prepare(out, **dedup):
        cfg = from_dict(PrepareConfig, {
            "out_dir": str(tmp_path / out), "dedup": {"threshold": 0.9, **dedup},
            "sets": {"docs": {"sources": [str(tmp_path / "a.jsonl")], "text_fields": ["text"]}}})
        totals = run_prepare(cfg)
        kept = {json.loads(l)["id"] for l in
                (tmp_path / out / "docs/train.jsonl").read_text().splitlines()}
        return totals, kept

    totals, kept = prepare("out")
    removed = n - len(kept & set(range(n, 2 * n)))
    assert removed / n >= 0.99, removed
    assert set(range(n)) <= kept                       # every distinct document kept
    assert totals["near_duplicate"] == removed
    assert totals["near_candidates"] >= removed
    md = (tmp_path / "out/stats.md").read_text()
    assert "near_candidates" in md and "near_duplicate" in md
    narrow, kept_narrow = prepare("narrow", candidate_threshold=0.9)
    assert narrow["near_duplicate"] / n < 0.95, narrow   # LSH at the threshold misses pairs
    assert set(range(n)) <= kept_narrow
