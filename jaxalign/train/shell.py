"""The loop shell every training loop runs in, supervised (`loop.train`) and RL
(`rl/driver.py`): the metrics writer, the progress line, the bad-step guard, checkpoints
(every N steps, every N minutes, at the end, on SIGTERM), held-out evaluation when due, the
export at the end, and closing all of it. A recipe hands it one callable, `body(shell, n,
state) -> Outcome`: one jitted step on the next batch (supervised), or one rollout and its
updates (RL).

Metrics are read one step late (`lag=1`): the shell dispatches step n + 1 before it pulls
step n's metrics to the host, so the host never waits on the device between steps (JAX
dispatches asynchronously; on the CPU the supervised body still waits for step n before it
dispatches step n + 1, after preparing its batch: `loop.train`). A step the shell must act
on at once is read at once: one that is checkpointed (the save needs its finite flag read
first, and the next step would donate its state), evaluated, the last one, and every step
once a stop is requested. The RL driver
uses `lag=0`: its iteration already waits on the device inside (decoding the rollout,
reading each minibatch's flags), so there is nothing left to overlap.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax

from jaxalign import runtime
from jaxalign.config import LoopConfig
from jaxalign.errors import JaxalignError
from jaxalign.metrics import MetricsWriter, Progress
from jaxalign.train.preempt import Preempted, StopFlag

log = logging.getLogger(__name__)


class NonFiniteLossError(JaxalignError):
    """The loss or gradient norm became NaN / Inf more often than allowed."""


class BadStepGuard:
    """Non-finite steps: the step leaves the params unchanged (`step.py`); up to
    `max_bad` in a row are skipped with a warning, one more stops the run, naming the last
    good checkpoint. `unit` names a loop position in messages ('step', 'iteration')."""

    def __init__(self, max_bad: int, ckpt_dir: Path, unit: str = "step"):
        self.max_bad, self.ckpt_dir, self.unit = max_bad, ckpt_dir, unit
        self.in_a_row = 0
        self.skipped = 0      # in total, for callers that report it

    def check(self, metrics: dict, at: int, saved_at: int) -> bool:
        """True when the step was finite. Raises NonFiniteLossError past the allowance, or
        at once when the update left non-finite params / optimizer state (pops
        `state_finite`): that state cannot be skipped, so it is never saved or exported."""
        kept = self._kept(saved_at)
        if metrics.pop("state_finite", 1.0) <= 0 and metrics["finite"] > 0:
            raise NonFiniteLossError(
                f"{self.unit} {at}: the optimizer update made the parameters or optimizer state "
                f"non-finite (loss {metrics['loss']}, grad norm {metrics['grad_norm']} finite); "
                f"check optim.lr / b1 / b2 / eps. Stopping without saving this state. {kept}")
        if metrics["finite"] > 0:
            self.in_a_row = 0
            return True
        self.bad(f"{self.unit} {at}: non-finite loss {metrics['loss']} / grad norm "
                 f"{metrics['grad_norm']}; params left unchanged", at, saved_at)
        return False

    def _kept(self, saved_at: int) -> str:
        return (f"The last good checkpoint ({self.unit} {saved_at}) in {self.ckpt_dir} is "
                f"intact." if saved_at else "No checkpoint was saved yet.")

    def bad(self, msg: str, at: int, saved_at: int) -> None:
        """Counts one bad step described by `msg`; raises past the allowance."""
        kept = self._kept(saved_at)
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row > self.max_bad:
            raise NonFiniteLossError(
                f"{msg}. Stopping: {self.in_a_row} bad step(s) in a row > "
                f"train.max_bad_steps={self.max_bad}. {kept}")
        log.warning("%s (skipped, %d in a row)", msg, self.in_a_row)


@dataclasses.dataclass
class Outcome:
    """What one step (supervised) or iteration (RL) hands the shell."""
    state: Any
    # The step's metrics: device arrays the shell reads (a jitted step's, with its `finite`
    # flags, which the guard checks), or host floats already checked; None: a skipped
    # iteration that writes nothing.
    metrics: dict | None
    perf: dict = dataclasses.field(default_factory=dict)
    # Tokens the step trained on: the shell times the step and adds step_s and tokens_per_s.
    tokens: int | None = None
    # Raised after this step is written and checkpointed (an RL monitor tripped).
    halt: Exception | None = None


class Shell:
    """One run's loop around `body`. `meta_of(n)`: the checkpoint JSON after step n (data
    position, ...), read right after step n, before the next batch is fetched.
    `eval_due(n)` / `evaluate(state, n, metrics, perf) -> stop early`: the held-out
    evaluation. `log_every`: metrics.jsonl gets every N-th step, the last and evaluated ones."""

    def __init__(self, run_dir: Path, cfg: LoopConfig, ckpts, start: int, total: int, *,
                 unit: str, fields, meta_of: Callable[[int], dict], run_config: dict | None,
                 log_every: int = 1, lag: int = 1,
                 eval_due: Callable[[int], bool] = lambda n: False,
                 evaluate: Callable[..., bool] | None = None):
        assert lag in (0, 1), lag
        self.cfg, self.ckpts, self.start, self.total, self.unit = cfg, ckpts, start, total, unit
        self.meta_of, self.log_every, self.lag = meta_of, log_every, lag
        self.eval_due, self.evaluate = eval_due, evaluate
        self.guard = BadStepGuard(cfg.max_bad_steps, ckpts.dir, unit=unit)
        self.saved_at, self.last, self.meta = start, {}, None
        self.stop: StopFlag | None = None
        self.writer = MetricsWriter(run_dir, resume_step=start, tensorboard=cfg.tensorboard,
                                    wandb_project=cfg.wandb_project, run_config=run_config)
        self.progress = Progress(total, start, enabled=cfg.progress, fields=fields, unit=unit)
        self._mark = time.perf_counter()

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, n: int, state) -> None:
        """Checkpoints `state` as step n, with the JSON recorded after step n."""
        self.ckpts.save(n, state, self.meta)
        self.saved_at = n

    def keep_previous(self, n: int, state) -> str:
        """Step n is abandoned before it touched `state`: checkpoint step n - 1 unless it is
        saved already; -> a sentence naming what is kept."""
        if self.saved_at != n - 1:
            self.save(n - 1, state)
        return (f"the checkpoint of {self.unit} {n - 1} in {self.ckpts.dir} is intact"
                if n > 1 else f"no {self.unit} completed, nothing saved")

    def abandon(self, n: int, state, what: str) -> None:
        """A stop was requested during `what` of step n, before it touched `state`: drop
        step n, keep step n - 1 and stop."""
        self.keep_previous(n, state)
        raise Preempted(f"stopped by signal during the {what} of {self.unit} {n}; {self.unit} "
                        f"{n - 1} is checkpointed" if n > 1 else
                        f"stopped by signal during the first {what}; nothing to save")

    def _save_due(self, n: int) -> bool:
        cfg = self.cfg   # short-circuits alike in every process: `due` is a collective
        return bool((cfg.save_every and n % cfg.save_every == 0) or n == self.total
                    or self.ckpts.due(cfg.save_every_minutes))

    # -- one step's metrics -----------------------------------------------------------------------
    def _finish(self, n: int, out: Outcome, state) -> bool:
        """Reads step n's metrics (waiting for the device), checks them with the guard,
        evaluates (`state` is step n's), writes and shows them; -> stop early."""
        metrics = {k: float(v) for k, v in jax.device_get(out.metrics).items()}
        perf = dict(out.perf)
        if out.tokens is not None:
            dt = time.perf_counter() - self._mark
            perf.update(step_s=dt, tokens_per_s=out.tokens / dt)
        if "finite" in metrics:   # a jitted step's flags; RL checks each minibatch itself
            metrics["skipped"] = float(not self.guard.check(metrics, n, self.saved_at))
            metrics.pop("finite")
        perf.update(runtime.compile_stats())
        early = False
        if self.evaluate is not None and self.eval_due(n):
            assert state is not None, "an evaluated step is read at once"
            early = self.evaluate(state, n, metrics, perf)
        if n % self.log_every == 0 or n == self.total or any(k.startswith("eval/") for k in metrics):
            self.writer.write(n, metrics, perf)
        self.progress.update(n, metrics, perf)
        self.last = metrics
        self._mark = time.perf_counter()
        return early

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, state, body: Callable[["Shell", int, Any], Outcome], end: int | None = None,
            on_end: Callable[[Any], None] | None = None) -> dict[str, float]:
        """Steps start + 1 .. end (default: total) through `body`, then `on_end(state)`;
        -> the last written metrics. Closes the writer, progress and checkpoints in any case."""
        end = self.total if end is None else end
        pending = None   # (n, outcome) whose metrics are read after step n + 1 is dispatched
        try:
            with StopFlag() as stop:
                self.stop = stop
                for n in range(self.start + 1, end + 1):
                    if n == self.start + 1 and stop.requested():   # while loading
                        raise Preempted(f"stopped by signal before {self.unit} {n}; nothing "
                                        "new to save")
                    out = body(self, n, state)
                    state = out.state
                    if pending is not None:
                        self._finish(*pending, None)
                        pending = None
                    if out.metrics is None:   # skipped: nothing to read or write
                        self.meta = self.meta_of(n)
                        stopping = stop.requested()
                        if self._save_due(n) or stopping:
                            self.save(n, state)
                        if stopping:
                            raise Preempted(f"stopped by signal at {self.unit} {n}; "
                                            "checkpoint saved")
                        continue
                    stopping = stop.requested()
                    due = self._save_due(n)
                    if not (self.lag == 0 or due or stopping or out.halt or self.eval_due(n)):
                        self.meta = self.meta_of(n)
                        pending = (n, out)
                        continue
                    early = self._finish(n, out, state)   # before any save: the flag first
                    self.meta = self.meta_of(n)
                    if due or stopping or out.halt or early:
                        if n == end or stopping or out.halt or early:
                            # No step follows: what the allocator keeps of the steps' freed
                            # buffers goes back before the save (and the export) allocate.
                            runtime.release_free_memory()
                        self.save(n, state)
                    if out.halt is not None:
                        raise out.halt
                    if stopping:
                        raise Preempted(f"stopped by signal at {self.unit} {n}; checkpoint saved")
                    if early:
                        break
                if pending is not None:
                    self._finish(*pending, None)
            if on_end is not None:
                on_end(state)
        finally:
            self.progress.close()
            self.writer.close()
            self.ckpts.close()
        return self.last
