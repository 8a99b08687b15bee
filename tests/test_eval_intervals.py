"""Bootstrap intervals of `jaxalign eval`: the percentile bootstrap against a hand
computation (the documented resampling, means and quantiles computed here with plain
loops) and against scipy.stats.bootstrap(method='percentile'); paired differences; the
intervals eval writes and the report draws."""

import math

import numpy as np
import pytest

from jaxalign.evaluate.intervals import bootstrap_ci, differences, paired_ci, with_intervals


def _hand_percentile(sorted_values, q):
    """numpy's default ('linear') quantile, by hand: position q / 100 * (n - 1)."""
    pos = q / 100.0 * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def _hand_bootstrap(x, resamples, confidence, seed):
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    means = sorted(sum(float(x[i]) for i in row) / len(x) for row in idx)
    tail = (1 - confidence) / 2 * 100
    return _hand_percentile(means, tail), _hand_percentile(means, 100 - tail)


X = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.25, 0.5, 1.0, 0.0, 0.75])


@pytest.mark.parametrize("confidence, seed", [(0.95, 0), (0.9, 7)])
def test_percentile_bootstrap_by_hand(confidence, seed):
    low, high = bootstrap_ci(X, resamples=500, confidence=confidence, seed=seed)
    want = _hand_bootstrap(X, 500, confidence, seed)
    assert (low, high) == pytest.approx(want, abs=1e-12)
    assert low < X.mean() < high and high - low > 0.2        # a real interval, not a point


def test_percentile_bootstrap_equals_scipy():
    from scipy.stats import bootstrap
    res = bootstrap((X,), np.mean, n_resamples=999, method="percentile", confidence_level=0.95,
                    rng=np.random.default_rng(3), vectorized=True)
    low, high = bootstrap_ci(X, resamples=999, confidence=0.95, seed=3)
    assert (low, high) == pytest.approx((res.confidence_interval.low,
                                         res.confidence_interval.high), abs=1e-12)


def test_paired_difference_resamples_prompts():
    """The interval of mean(a - b) over the same prompts: narrower than the unpaired spread
    when the policies' values move together, and equal to the hand computation on a - b."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=40)
    a, b = base + 0.3 + 0.05 * rng.normal(size=40), base
    diff, low, high = paired_ci(a, b, resamples=400, seed=2)
    assert diff == pytest.approx(np.mean(a - b))
    assert (low, high) == pytest.approx(_hand_bootstrap(a - b, 400, 0.95, 2), abs=1e-12)
    assert 0 < low < diff < high < 0.4                # clearly above zero: the pairing helps
    rows = differences({"gen/sft/exact_match": b, "gen/ppo/exact_match": a,
                        "gen/ppo/length": a}, ["sft", "ppo"], resamples=400, seed=2)
    assert rows == [{"a": "ppo", "b": "sft", "metric": "gen/exact_match", "diff": diff,
                     "ci_low": low, "ci_high": high, "n": 40}]
    assert with_intervals({"k": [1.0]}) == {}          # one value: no interval


def test_report_gain_line_reads_the_paired_interval():
    """The report's headline of the main job: the policy's exact-match gain over the reference
    with the paired interval from `differences`, its verdict, and the perplexity / length
    change that the gain must not cost (relative to the reference's)."""
    from jaxalign.report import gain_lines
    rng = np.random.default_rng(4)
    sft = (rng.random(120) < 0.6).astype(float)
    ppo = np.where(rng.random(120) < 0.25, 1.0, sft)           # some wrong answers fixed
    worse = np.where(rng.random(120) < 0.5, 0.0, sft)
    per_item = {"gen/sft/exact_match": sft, "gen/ppo/exact_match": ppo,
                "gen/bad/exact_match": worse}
    diffs = differences(per_item, ["sft", "ppo", "bad"], resamples=300, seed=0)
    table = {"sft": {"ppl/perplexity": 1.25, "gen/length": 10.0},
             "ppo": {"ppl/perplexity": 1.3, "gen/length": 9.5}, "bad": {}}
    lines = gain_lines(table, diffs).splitlines()
    assert len(lines) == 3                                      # ppo-sft, bad-sft, bad-ppo
    gain = next(d for d in diffs if (d["a"], d["b"]) == ("ppo", "sft"))
    assert gain["ci_low"] > 0
    assert lines[0] == (f"- ppo - sft, held-out exact match: {ppo.mean() - sft.mean():+.3f} "
                        f"[{gain['ci_low']:+.3f}, {gain['ci_high']:+.3f}] on 120 prompts "
                        f"(interval above zero); perplexity 1.25 -> 1.3 (+4.0%); "
                        f"length 10 -> 9.5 (-5.0%)")
    assert "bad - sft" in lines[1] and lines[1].endswith("(interval below zero)")
    flat = [{"a": "x", "b": "y", "metric": "gen/exact_match", "diff": 0.0, "ci_low": -0.1,
             "ci_high": 0.1, "n": 5}]
    assert gain_lines({}, flat).rstrip().endswith("(interval includes zero)")
    assert gain_lines(table, [dict(flat[0], metric="gen/length")]) == ""
