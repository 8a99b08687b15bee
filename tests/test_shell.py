"""The loop shell (`jaxalign/train/shell.py`) on a small jitted step with real checkpoints:
metrics read one step late, a checkpointed step read before it is saved, a non-finite state
never saved, the bad-step allowance, preemption saving the last read step."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import pytest

from jaxalign.checkpoint import TrainCheckpoints
from jaxalign.config import LoopConfig
from jaxalign.train.preempt import Preempted
from jaxalign.train.shell import NonFiniteLossError, Outcome, Shell


@jax.jit
def _step(state, bad):
    """state + 1, with the flags the shared train step returns; `bad` 1: a non-finite loss
    (state kept), 2: a non-finite state."""
    loss = jnp.where(bad == 1, jnp.nan, state["x"].sum())
    new = {"x": jnp.where(bad == 2, jnp.inf, state["x"] + jnp.where(bad == 1, 0.0, 1.0))}
    return new, {"loss": loss, "grad_norm": jnp.float32(1.0), "finite": (bad != 1) * 1.0,
                 "state_finite": jnp.isfinite(new["x"]).all() * 1.0}


def _run(tmp_path, steps, *, bad=(), signal_at=None, lag=1, **cfg):
    """Runs the shell for `steps`; -> (what each body call saw written, checkpoint steps)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    ckpts = TrainCheckpoints(tmp_path, keep=10)
    shell = Shell(tmp_path, LoopConfig(save_every_minutes=0, tensorboard=False, progress=False,
                                       **cfg),
                  ckpts, 0, steps, unit="step", fields=("loss",),
                  meta_of=lambda n: {"step": n}, run_config=None, lag=lag)
    seen = {}

    def body(shell, n, state):
        metrics = tmp_path / "metrics.jsonl"
        seen[n] = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] \
            if metrics.exists() else []
        state, out = _step(state, jnp.int32(bad[n] if n in bad else 0))
        if n == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return Outcome(state, out, tokens=8)

    shell.run({"x": jnp.zeros(2)}, body)
    return seen, sorted(TrainCheckpoints(tmp_path).manager.all_steps())


def test_metrics_are_read_one_step_late(tmp_path):
    seen, saved = _run(tmp_path, 6, save_every=3)
    # When step n + 1 is dispatched, step n - 1 is written but not step n, except after a
    # checkpointed step (3), which is read before it is saved.
    assert seen[2] == [] and seen[3] == [1] and seen[4] == [1, 2, 3] and seen[6] == [1, 2, 3, 4]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in lines] == [2.0 * n for n in range(6)]   # each step's own
    assert saved == [3, 6]


def test_lag_zero_reads_every_step_before_the_next(tmp_path):
    seen, _ = _run(tmp_path, 4, lag=0)
    assert seen[2] == [1] and seen[4] == [1, 2, 3]


def test_a_non_finite_state_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 4: the optimizer update made"):
        _run(tmp_path, 8, save_every=4, bad={4: 2})
    assert TrainCheckpoints(tmp_path).latest_step() is None


def test_a_late_read_non_finite_state_stops_before_the_next_save(tmp_path):
    # Step 2's flag is read after step 3 is dispatched; the run stops before saving 4.
    with pytest.raises(NonFiniteLossError, match="step 2: the optimizer update made"):
        _run(tmp_path, 8, save_every=4, bad={2: 2})
    assert TrainCheckpoints(tmp_path).latest_step() is None


def test_bad_steps_within_the_allowance_are_skipped_and_counted(tmp_path):
    _run(tmp_path, 5, max_bad_steps=1, bad={2: 1, 4: 1})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [0, 1, 0, 1, 0]
    with pytest.raises(NonFiniteLossError, match="2 bad step"):
        _run(tmp_path / "again", 5, max_bad_steps=1, bad={2: 1, 3: 1})


def test_preemption_saves_the_step_it_stopped_at(tmp_path):
    with pytest.raises(Preempted, match="at step 3; checkpoint saved"):
        _run(tmp_path, 8, signal_at=3)
    assert TrainCheckpoints(tmp_path).latest_step() == 3
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
