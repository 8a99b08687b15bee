"""The progress line: per algorithm, the metrics that matter for it, and an ETA from the steps
after the first (which compiles)."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import pytest

from jaxalign import metrics
from jaxalign.losses.kto import kto_loss
from jaxalign.losses.preference import bradley_terry, dpo_loss
from jaxalign.losses.xent import masked_xent
from jaxalign.train.recipes import RECIPES


def _keys(loss_and_metrics):
    return set(loss_and_metrics[1])


def test_each_recipe_shows_metrics_its_loss_returns():
    a, b = jnp.array([-3.0, -5.0]), jnp.array([-4.0, -4.5])
    sft = _keys(masked_xent(jnp.zeros((1, 3, 5)), jnp.array([[1, 2, 3]]), jnp.ones((1, 3))))
    perf = {"tokens_per_s"}  # the loop's wall-clock figures
    assert set(RECIPES["sft"].progress) <= sft | perf
    assert set(RECIPES["rm"].progress) <= _keys(bradley_terry(a, b))
    assert set(RECIPES["dpo"].progress) <= _keys(dpo_loss(a, b, b, a, beta=0.1))
    assert set(RECIPES["kto"].progress) <= _keys(kto_loss(a, b, a, b, jnp.array([1, 0]), beta=0.1))
    # the ppo row against a real run's metrics.jsonl: tests/test_ppo.py


def test_kto_accuracy_is_rows_on_their_labels_side_of_the_reference_point():
    pol, ref = jnp.array([-1.0, -2.0, -3.0, -4.0]), jnp.array([-2.0, -1.0, -3.5, -3.0])
    kl_pol, kl_ref = jnp.array([-5.0] * 4), jnp.array([-5.25] * 4)   # z = 0.25
    label = jnp.array([1, 1, 0, 0])
    # log-ratios 1, -1, 0.5, -1: right, wrong (desirable below z), wrong (undesirable above), right
    _, m = kto_loss(pol, ref, kl_pol, kl_ref, label, beta=0.1)
    assert float(m["rewards/accuracies"]) == 0.5


@pytest.mark.parametrize("fields, shown", [
    (RECIPES["sft"].progress, "loss 1.5 acc 0.25 tok/s 1234"),
    (RECIPES["rm"].progress, "loss 0.6 acc 0.75 margin 0.125"),
    (RECIPES["dpo"].progress, "loss 0.6 acc 0.5 margin 0.0625 | eval loss 0.7 acc 0.5"),
    (RECIPES["ppo"].progress, "reward 0.3 kl 0.02 entropy 1.1 len 7.5"),
])
def test_progress_text_per_algorithm(fields, shown):
    m = {"loss": 1.5 if fields is RECIPES["sft"].progress else 0.6, "token_accuracy": 0.25,
         "accuracy": 0.75, "margin": 0.125, "rewards/accuracies": 0.5, "rewards/margins": 0.0625,
         "reward_mean": 0.3, "kl": 0.02, "entropy": 1.1, "response_length": 7.5,
         "lr": 1e-4, "grad_norm": 3.0}
    if fields is RECIPES["dpo"].progress:
        m.update({"eval/loss": 0.7, "eval/rewards/accuracies": 0.5})
    assert metrics.progress_text(fields, m, {"tokens_per_s": 1234.4}) == shown


def test_eta_leaves_out_the_compiling_first_step(monkeypatch, caplog):
    clock = iter([0.0,            # construction
                  60.0,           # step 1 ends: a minute of compilation
                  61.0, 62.0])    # steps 2 and 3: one second each
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(metrics.sys.stderr, "isatty", lambda: False, raising=False)
    p = metrics.Progress(10, 0, log_seconds=1e9, fields=RECIPES["rm"].progress)
    with caplog.at_level(logging.INFO, logger="jaxalign.metrics"):
        p.update(1, {"loss": 0.7, "accuracy": 0.5, "margin": 0.0}, {})
        p.update(2, {"loss": 0.6, "accuracy": 0.5, "margin": 0.1}, {})
        p.update(3, {"loss": 0.5, "accuracy": 1.0, "margin": 0.2}, {})
    assert p.eta(3, now=62.0) == pytest.approx(7.0)   # 1 s a step x 7 steps left, not 62/3 x 7
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["step 1/10 loss 0.7 acc 0.5 margin 0 (first step took 60.0s; eta from the next)"]
