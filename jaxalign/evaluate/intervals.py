"""Percentile bootstrap confidence intervals for the mean of per-prompt (or per-pair)
values, and for the mean difference of two policies on the same prompts (paired).

The resampling is spelled out so that anyone can recompute it: `resamples` rows of n
indices drawn at once as `numpy.random.default_rng(seed).integers(0, n, (resamples, n))`,
the mean of each resample, and the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of
those means (numpy's default linear interpolation): scipy.stats.bootstrap's
method='percentile' draws and reads them the same way. A paired difference resamples the
prompts, not the two policies separately: the interval of mean(a - b).
"""

from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(values, *, resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """(low, high) of the percentile bootstrap interval of mean(values); NaN values are
    dropped first; (nan, nan) for fewer than two values."""
    x = np.asarray(values, np.float64)
    x = x[~np.isnan(x)]
    if len(x) < 2 or resamples < 1:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))
    means = x[idx].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def paired_ci(a, b, **kw) -> tuple[float, float, float]:
    """(mean(a - b), low, high): the difference of two policies' values on the same prompts."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
    d = a - b
    ok = d[~np.isnan(d)]
    return (float(ok.mean()) if len(ok) else math.nan, *bootstrap_ci(d, **kw))


def with_intervals(per_item: dict[str, np.ndarray], **kw) -> dict[str, float]:
    """{key: values} -> {key/ci_low, key/ci_high} for every key with two values or more."""
    out = {}
    for key, values in per_item.items():
        low, high = bootstrap_ci(values, **kw)
        if math.isfinite(low):   # fewer than two values: no interval
            out[f"{key}/ci_low"], out[f"{key}/ci_high"] = low, high
    return out


def differences(per_item: dict[str, np.ndarray], names: list[str], **kw) -> list[dict]:
    """Every pair of policies (later minus earlier in `names`, so policy - reference) on every
    per-prompt generation metric both have: {a, b, metric, diff, ci_low, ci_high, n}.
    `per_item` keys are gen/<name>/<metric>."""
    rows = []
    for j, a in enumerate(names):
        for b in names[:j]:
            for key in sorted(per_item):
                head, name, metric = key.split("/", 2)
                other = f"{head}/{b}/{metric}"
                if name != a or other not in per_item:
                    continue
                diff, low, high = paired_ci(per_item[key], per_item[other], **kw)
                if not math.isfinite(low):
                    continue
                rows.append({"a": a, "b": b, "metric": f"{head}/{metric}", "diff": diff,
                             "ci_low": low, "ci_high": high, "n": int(len(per_item[key]))})
    return rows
