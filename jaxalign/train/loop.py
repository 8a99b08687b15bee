"""The one training loop, shared by SFT, reward modelling, DPO and PPO.

Plain Python around one jitted step: fetch a batch, step, log, evaluate, checkpoint.
Resuming is rerunning: the latest checkpoint restores the TrainState and the data
position, and metrics.jsonl is cut back to that step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from jaxalign import runtime
from jaxalign.checkpoint import TrainCheckpoints
from jaxalign.config import ConfigError, JaxalignError
from jaxalign.metrics import MetricsWriter, Progress
from jaxalign.sharding import batch_sharding
from jaxalign.train.optim import OptimConfig, make_optimizer
from jaxalign.train.step import LossFn, TrainState, init_state, jit_train_step, make_eval_step, \
    make_train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int
    batch_size: int                 # rows per optimizer step, all processes together
    grad_accum: int = 1             # micro-batches per step (batch_size / grad_accum rows each)
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0             # 0: evaluate only at the end (when there is eval data)
    eval_batches: int = 0           # 0: the whole eval set
    save_every: int = 0             # 0: checkpoint only at the end (and on SIGTERM / SIGINT)
    keep_checkpoints: int = 3
    max_bad_steps: int = 0          # non-finite steps skipped in a row before the run stops
    tensorboard: bool = True
    wandb_project: str | None = None
    export_hf: bool = False         # write run_dir/hf at the end
    progress: bool = True
    # Positions per LM-head chunk in token losses; 0 builds the full (B, T, V) logits.
    logits_chunk: int = 128

    def __post_init__(self):
        for key in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "eval_batches", "save_every", "max_bad_steps", "logits_chunk"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size ({self.batch_size}) must be a multiple of "
                              f"train.grad_accum ({self.grad_accum})")


class NonFiniteLossError(JaxalignError):
    """The loss or gradient norm became NaN / Inf more often than allowed."""


class Loader(Protocol):
    def __next__(self) -> dict[str, np.ndarray]: ...
    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


@dataclasses.dataclass
class Task:
    """What an algorithm hands the loop."""
    loss_fn: LossFn
    train_data: Loader                                   # this process's rows of each batch
    eval_data: Callable[[], Iterable[dict]] | None = None
    # Work outside the gradient on each batch (e.g. DPO reference log-probs); jitted by the owner.
    prepare: Callable[[dict], dict] | None = None
    # Report eval/perplexity = exp(eval/loss): only meaningful for a token-level NLL.
    perplexity: bool = True


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows -> one global array per key, rows split over data x fsdp."""
    sh = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}


def _check_batch_fits(cfg: TrainConfig, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum
    if micro % shards:
        raise ConfigError(f"train.batch_size / train.grad_accum = {micro} rows per micro-batch "
                          f"cannot be split over data x fsdp = {shards} devices; use a multiple of {shards}")


class _StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean stop after the current step."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        log.warning("received %s: will checkpoint and stop after this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def evaluate(eval_step, params, frozen, batches: Iterable[dict], mesh: Mesh, limit: int = 0,
             perplexity: bool = True) -> dict:
    sums: dict[str, float] = {}
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        out = jax.device_get(eval_step(params, frozen, put_batch(batch, mesh)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    weight = max(sums.pop("weight", 0.0), 1e-9)
    metrics = {f"eval/{k[:-4]}": v / weight for k, v in sums.items()}
    if perplexity and "eval/loss" in metrics:
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
    return metrics


def train(*, run_dir: str | Path, cfg: TrainConfig, optim: OptimConfig, mesh: Mesh,
          trainable, frozen, frozen_shardings, task: Task, run_config: dict | None = None,
          on_end: Callable[[TrainState], None] | None = None) -> dict[str, float]:
    """Runs (or resumes) training to `cfg.steps`; returns the last logged metrics."""
    run_dir = Path(run_dir)
    _check_batch_fits(cfg, mesh)
    runtime.count_compilations()  # perf.jsonl shows any recompilation after warm-up
    optimizer, schedule = make_optimizer(optim, cfg.steps)
    # Optimizer moments inherit each param's sharding through the jitted init.
    state = jax.jit(init_state, static_argnums=(1, 2))(trainable, optimizer, cfg.seed)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    ckpts = TrainCheckpoints(run_dir, keep=cfg.keep_checkpoints)
    start = ckpts.latest_step() or 0
    if start:
        state, meta = ckpts.restore(start, state, state_sh)
        task.train_data.restore(meta["data"])
        log.info("resumed %s at step %d", run_dir, start)

    step_fn = jit_train_step(make_train_step(task.loss_fn, optimizer, schedule,
                                             grad_accum=cfg.grad_accum),
                             state_sh, frozen_shardings, batch_sharding(mesh))
    eval_step = make_eval_step(task.loss_fn) if task.eval_data is not None else None
    writer = MetricsWriter(run_dir, resume_step=start, tensorboard=cfg.tensorboard,
                           wandb_project=cfg.wandb_project, run_config=run_config)
    progress = Progress(cfg.steps, start, enabled=cfg.progress)
    last: dict[str, float] = {}
    bad_in_a_row, saved_at = 0, start

    def save(step):
        nonlocal saved_at
        ckpts.save(step, state, {"data": task.train_data.state(), "step": step})
        saved_at = step

    try:
        with _StopFlag() as stop:
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                host_batch = next(task.train_data)
                tokens = int((host_batch["segment_ids"] > 0).sum()) if "segment_ids" in host_batch else 0
                batch = put_batch(host_batch, mesh)
                if task.prepare is not None:
                    batch = task.prepare(batch)
                state, metrics = step_fn(state, frozen, batch)
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - t0
                finite = metrics.pop("finite") > 0
                metrics["skipped"] = float(not finite)
                if not finite:
                    bad_in_a_row += 1
                    msg = (f"step {step}: non-finite loss {metrics['loss']} / grad norm "
                           f"{metrics['grad_norm']}; params left unchanged")
                    if bad_in_a_row > cfg.max_bad_steps:
                        raise NonFiniteLossError(
                            f"{msg}. Stopping: {bad_in_a_row} bad step(s) in a row > "
                            f"train.max_bad_steps={cfg.max_bad_steps}. The last good checkpoint "
                            f"(step {saved_at}) in {ckpts.dir} is intact.")
                    log.warning("%s (skipped, %d in a row)", msg, bad_in_a_row)
                else:
                    bad_in_a_row = 0
                perf = {"step_s": dt, "tokens_per_s": tokens / dt, **runtime.compile_stats()}
                if eval_step is not None and (
                        (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                    metrics.update(evaluate(eval_step, state.params, frozen, task.eval_data(), mesh,
                                            cfg.eval_batches, task.perplexity))
                if step % cfg.log_every == 0 or step == cfg.steps or "eval/loss" in metrics:
                    writer.write(step, metrics, perf)
                progress.update(step, metrics, perf)
                last = metrics
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    save(step)
                if stop.signum is not None:
                    if saved_at != step:
                        save(step)
                    raise KeyboardInterrupt(f"stopped by signal at step {step}; checkpoint saved")
        if on_end is not None:
            on_end(state)
    finally:
        progress.close()
        writer.close()
        ckpts.close()
    return last
