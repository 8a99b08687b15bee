"""The one supervised training loop (SFT, reward modelling, DPO) and the mechanics the RL
driver shares with it: the run files, start-or-resume from the latest checkpoint, batches
onto the mesh, ahead-of-time compiling.

One jitted step on the next batch, run by the loop shell (`shell.py`: logging, the bad-step
guard, evaluation, checkpoints, preemption), which reads each step's metrics one step late.
Resuming is rerunning: the latest checkpoint restores the TrainState and the data
position, and metrics.jsonl is cut back to that step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Iterable, Protocol

import jax
import numpy as np
import yaml
from jax.sharding import Mesh

from jaxalign import distributed, faults, runtime
from jaxalign.checkpoint import TrainCheckpoints, describe_run
from jaxalign.config import ConfigError, ModelConfig, OptimConfig, TrainConfig
from jaxalign.precision import rounds_stochastically
from jaxalign.rundir import write_atomic
from jaxalign.train.recipes import RECIPES
from jaxalign.sharding import batch_sharding, replicated
from jaxalign.train.optim import make_optimizer
from jaxalign.train.shell import Outcome, Shell
from jaxalign.train import preflight
from jaxalign.train.preflight import Knobs
from jaxalign.train.step import LossFn, TrainState, init_state, jit_train_step, make_eval_step, \
    make_train_step, state_shardings

log = logging.getLogger(__name__)


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
    # Report eval/perplexity = exp(eval/loss): only meaningful for a token-level NLL.
    perplexity: bool = True
    # The metrics the progress line shows: the recipe's row of RECIPES.
    progress: tuple[str, ...] = RECIPES["sft"].progress
    # The same loss for another layout of the trained model (its ModelConfig): the loop
    # retries with model.remat=full when the backend's default layout does not fit.
    loss_for: Callable[[ModelConfig], LossFn] | None = None


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
    # The loaders give process i rows [i B / P, (i + 1) B / P): its devices must hold those.
    distributed.check_even_split(mesh, cfg.batch_size, "train.batch_size")


def resolved_config(cfg, raw_config: dict | None) -> dict:
    """The config as written to config.yaml: the YAML as given, or the dataclass as JSON."""
    if raw_config is not None:
        return raw_config
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def write_run_files(run_dir: Path, raw: dict, *, algorithm: str, model: ModelConfig,
                    hf_config: dict, base: str | None, tokenizer_dir, policy_path=(),
                    base_revision: str | None = None) -> None:
    """config.yaml (the resolved config) and run.json (what the trained model is, so that
    `checkpoint.load_model(run_dir)` rebuilds it without knowing the algorithm)."""
    if jax.process_index() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(raw, sort_keys=False))
    describe_run(run_dir, algorithm=algorithm, cfg=model, hf_config=hf_config, base=base,
                 tokenizer_dir=tokenizer_dir, policy_path=policy_path, base_revision=base_revision)


def start_or_resume(run_dir: Path, trainable, optimizer, seed: int, keep: int):
    """-> (state, its shardings, checkpoints, start step, checkpoint JSON or None). A fresh
    state (optimizer moments sharded like their params), or the
    latest checkpoint's restored onto the same shardings (`step.state_shardings`)."""
    param_sh = jax.tree.map(lambda x: x.sharding, trainable)
    first = jax.tree.leaves(param_sh)[0]
    # Params placed without a mesh (one device, e.g. straight from hf.load): scalars go there too.
    rep = replicated(first.mesh) if hasattr(first, "mesh") else first
    state_sh = state_shardings(optimizer, trainable, param_sh, rep)
    state = jax.jit(init_state, static_argnums=(1, 2), out_shardings=state_sh)(trainable, optimizer,
                                                                              seed)
    ckpts = TrainCheckpoints(run_dir, keep=keep, set_aside_incomplete=True)
    start = ckpts.latest_step() or 0
    meta = None
    if start:
        state, meta = ckpts.restore(start, state, state_sh)
        log.info("resumed %s at %d", run_dir, start)
    return state, state_sh, ckpts, start, meta


def next_batch(loader: Loader) -> dict[str, np.ndarray]:
    batch = next(loader)
    faults.point("batch")
    return batch


def shapes(batch: dict) -> tuple:
    return tuple((k, v.shape) for k, v in sorted(batch.items()))


def abstract(tree, sh=None):
    """ShapeDtypeStructs with each leaf's sharding (or `sh` for all): what AOT lowering takes."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=sh or x.sharding), tree)


def check_memory(run_dir: Path, mesh: Mesh, step_fn, state, frozen, cfg: TrainConfig,
                 model: ModelConfig | None) -> dict | None:
    """The memory pre-flight of a supervised run (`preflight.check`) on its compiled step;
    step_fn None: the part that needs no compile (`preflight.check_resident`).
    `model`: the trained model's config (for the remat / LoRA suggestions), if known."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.grad_accum
    knobs = Knobs(remat=model.remat if model else "none", grad_accum=cfg.grad_accum,
                  can_double_accum=micro % 2 == 0 and (micro // 2) % shards == 0,
                  lora_rank=model.lora_rank if model else 0, fsdp=mesh.shape["fsdp"],
                  devices=jax.device_count())
    resident = {"params": state.params, "optimizer": (state.opt_state, state.rng, state.step),
                "frozen": frozen}
    if step_fn is None:  # not compiled yet: the resident arrays alone
        return preflight.check_resident(run_dir, mesh, resident, knobs, cfg.memory_limit_gb)
    return preflight.check(run_dir, mesh, {"train_step": (step_fn, [state, frozen])}, resident,
                           knobs, cfg.memory_limit_gb)


def total_steps(cfg: TrainConfig, loader) -> int:
    """train.steps, or the steps that make train.epochs over the loader's data."""
    if cfg.steps is not None:
        return cfg.steps
    if not hasattr(loader, "steps_for_epochs"):
        raise ConfigError("train.epochs needs a training set of known size; give train.steps")
    steps = loader.steps_for_epochs(cfg.epochs)
    log.info("train.epochs=%g: %d steps of %d rows", cfg.epochs, steps, cfg.batch_size)
    return steps


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
          on_end: Callable[[TrainState], None] | None = None,
          model: ModelConfig | None = None, remat_chosen: bool = True,
          scan_chosen: bool = True) -> dict[str, float]:
    """Runs (or resumes) training to `cfg.steps` (or `cfg.epochs` turned into steps);
    returns the last logged metrics. `model`: the trained model's config, for the memory
    pre-flight's advice. `remat_chosen` False (model.remat left to the backend's default):
    a step that does not fit in that layout is compiled again with model.remat=full
    (`task.loss_for`), in scanned layers unless `scan_chosen` (model.scan_layers set), before
    the run is refused."""
    run_dir = Path(run_dir)
    _check_batch_fits(cfg, mesh)
    cfg = dataclasses.replace(cfg, steps=total_steps(cfg, task.train_data), epochs=None)
    runtime.count_compilations()  # perf.jsonl shows any recompilation after warm-up
    optimizer, schedule = make_optimizer(optim, cfg.steps)
    round_weights = model is not None and rounds_stochastically(
        model.dtype, model.param_dtype, cfg.stochastic_rounding)
    state, state_sh, ckpts, start, meta = start_or_resume(run_dir, trainable, optimizer, cfg.seed,
                                                          cfg.keep_checkpoints)
    if meta is not None:
        task.train_data.restore(meta["data"])

    def jit_step(loss_fn):
        return jit_train_step(make_train_step(loss_fn, optimizer, schedule,
                                              grad_accum=cfg.grad_accum,
                                              round_weights=round_weights),
                              state_sh, frozen_shardings, batch_sharding(mesh))

    jitted = jit_step(task.loss_fn)

    def compile_for_shapes(batch):   # the current `jitted` (the fallback below replaces it)
        return jitted.lower(abstract(state), abstract(frozen), abstract(batch)).compile()

    # The first batch gives the step's input shapes: the step is compiled ahead of time once,
    # its memory analysis checked against the devices (preflight), and the same executable runs.
    first, step_fn = None, None
    try:
        if start < cfg.steps:
            first = next_batch(task.train_data)
            batch0 = put_batch(first, mesh)
            check_memory(run_dir, mesh, None, state, frozen, cfg, model)   # before compiling
            step_fn = compile_for_shapes(batch0)
            try:
                check_memory(run_dir, mesh, step_fn, state, frozen, cfg, model)
            except preflight.MemoryPreflightError as e:
                if remat_chosen or task.loss_for is None or model is None or \
                        model.remat == "full":
                    raise
                # Every process takes the same turn: the limit is agreed, the shapes are equal.
                model = model.replace(remat="full", unroll_up_to=0,
                                      scan_layers=model.scan_layers if scan_chosen else True)
                log.warning("%s; model.remat is not set, so this run recomputes each layer in "
                            "the backward instead (model.remat=full in %s layers, the least "
                            "memory)", str(e).split("; refused")[0],
                            "scanned" if model.scan_layers else "unrolled")
                jitted = jit_step(task.loss_for(model))
                step_fn = compile_for_shapes(batch0)
                check_memory(run_dir, mesh, step_fn, state, frozen, cfg, model)
    except BaseException:
        ckpts.close()
        raise
    # Batches whose row length is chosen per batch (the preference layouts' buckets) get one
    # executable per shape, compiled the first time the shape comes.
    programs = {shapes(batch0): step_fn} if step_fn is not None else {}

    def compiled_for(batch):
        key = shapes(batch)
        if key not in programs:
            programs[key] = compile_for_shapes(batch)
        return programs[key]

    eval_step = make_eval_step(task.loss_fn, round_weights) if task.eval_data is not None else None

    # On the CPU, XLA allocates a step's temporaries when the step is dispatched: dispatched
    # while the previous step still runs, its buffers would be a second set beside that step's,
    # and the allocator keeps both resident (8.2 against 5.5 GiB for the bf16 SmolLM2 step at
    # 8 x 256). So there the next batch is prepared while the previous step runs, and the step
    # is dispatched once that step is done: measured 4.60 / 4.64 s a step at 5.5 GiB against
    # 4.81 / 4.84 s at 8.1 GiB dispatching early
    # (docs/bench/2026-12-07_cpu_sft_dispatch_wait.txt). Accelerators keep their queue full.
    wait_for_previous = mesh.devices.flat[0].platform == "cpu"
    # ... and a moment longer where the step's temporaries are large: XLA's CPU client frees
    # them just after the outputs are ready (`runtime.settle_seconds`).
    settle = runtime.settle_seconds(step_fn) if wait_for_previous and step_fn is not None else 0.0

    def step(shell: Shell, n: int, state) -> Outcome:
        nonlocal first
        host_batch, first = (first, None) if first is not None else \
            (next_batch(task.train_data), None)
        tokens = int((host_batch["segment_ids"] > 0).sum()) if "segment_ids" in host_batch else 0
        batch = put_batch(host_batch, mesh)
        if wait_for_previous:
            jax.block_until_ready(state)
            if settle:
                time.sleep(settle)
        state, metrics = compiled_for(batch)(state, frozen, batch)
        faults.point("step")
        return Outcome(state, metrics, tokens=tokens)   # metrics still on the device

    def evaluate_at(state, n: int, metrics: dict, perf: dict) -> bool:
        metrics.update(evaluate(eval_step, state.params, frozen, task.eval_data(), mesh,
                                cfg.eval_batches, task.perplexity))
        return False

    shell = Shell(run_dir, cfg, ckpts, start, cfg.steps, unit="step", fields=task.progress,
                  meta_of=lambda n: {"data": task.train_data.state(), "step": n},
                  run_config=run_config, log_every=cfg.log_every, lag=1,
                  eval_due=lambda n: (eval_step is not None and (
                      (cfg.eval_every and n % cfg.eval_every == 0) or n == cfg.steps)),
                  evaluate=evaluate_at)
    return shell.run(state, step, on_end=on_end)
