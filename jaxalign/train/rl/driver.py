"""The RL driver every objective shares: rollout -> score -> advantages -> updates.

One iteration, top to bottom:
  1. the next prompts (`PromptStream`), left-padded to one length, each repeated
     num_generations times (a group: consecutive rows);
  2. one jitted rollout: sample from the live policy params (the prompt's prefill once per
     group), then the training forward for the policy / reference log-probs, values and the
     reward model's score (one row per group where that is exact and cheaper, `groups.py`);
  3. on the host: decode, call the reward functions (with the prompt rows' other columns),
     EOS penalty, normalise, clip;
  4. one jitted advantage computation, the objective's (`objectives.py`);
  5. the rollout trimmed to its own prompt / response buckets; ppo.epochs passes of
     ppo.minibatches steps (whole groups each when grouped) through `make_train_step`,
     stopping early when an epoch's approx KL exceeds ppo.max_approx_kl;
  6. the KL controller, metrics, samples, monitors, checkpoint.

The roles (policy, reference, value, reward) are loaded by `roles.py`; their
sizes are logged (and written to memory.json) from param byte counts and the compiled
programs' memory analysis before the first update.

Several processes (hosts): every process walks the same prompt stream and runs the same
programs on the global arrays; it samples, decodes and scores only the rows its devices hold
(`distributed.process_rows`), the per-row host figures are exchanged once per iteration
(`hosts.py`), advantages see every group whole inside the jitted program, minibatches are
gathered on the devices, process 0 writes the run's files, and all save checkpoints together.
The metrics equal one process's on the same global rollout.

Resuming is rerunning: the checkpoint holds the TrainState (params, optimizer, RNG) and, in
its JSON, the prompt-stream position, the KL coefficient and the running reward moments;
the rollout key is derived from the state's RNG and the iteration, so a resumed run
reproduces metrics.jsonl exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import distributed, faults, runtime, sharding
from jaxalign.config import JaxalignError
from jaxalign.generate import eos_ids_for
from jaxalign.losses.ppo import adaptive_kl_update
from jaxalign.metrics import truncate_jsonl
from jaxalign.models import functional, lora
from jaxalign.precision import rounds_stochastically
from jaxalign.train.loop import abstract, put_batch, start_or_resume
from jaxalign.train.recipes import RECIPES
from jaxalign.train.optim import make_optimizer
from jaxalign.train.rl import groups, heldout as H, hosts, objectives, prompts as RP, rollout as R
from jaxalign.train.rl.memtrace import PhaseMemory
from jaxalign.train.rl.programs import compiled
from jaxalign.train.rl.config import RLConfig
from jaxalign.train.rl.loading import Loaded, load
from jaxalign.train.rl.rewards import RewardFunctionError, RunningMoments, TrainerState, \
    TRLInputs
from jaxalign.train.rl.roles import check_memory, memory_report, nbytes
from jaxalign.export import write_merged
from jaxalign.train.setup import run_recipe
from jaxalign.train.shell import Outcome, Shell
from jaxalign.train.step import jit_train_step, make_train_step

log = logging.getLogger(__name__)

_ROLLOUT_SALT = 0x5EED


class MonitorStop(JaxalignError):
    """A monitor with action 'stop' tripped (entropy floor, KL ceiling)."""


class NonFiniteRewards(JaxalignError):
    """Every row of a rollout scored NaN / inf: the iteration counts as a bad step."""


# ----------------------------------------------------------------------------- driver

def _mean_metrics(records: list[dict]) -> dict:
    keys = records[0].keys() if records else ()
    return {k: float(np.mean([r[k] for r in records])) for k in keys}


def run_rl(cfg: RLConfig, raw_config: dict | None = None, devices=None) -> dict[str, float]:
    """Runs (or resumes) an RL objective in cfg.out_dir; returns the last iteration's metrics."""
    return run_recipe(cfg, raw_config, devices, algorithm=cfg.algorithm, load=load,
                      run=lambda c, loaded, run_dir, mesh, raw: _Run(c, run_dir, mesh, loaded,
                                                                     raw).run(),
                      policy_path=("policy",))


class _Run:
    """The state of one run; `run` is the loop. A class only to keep the loop body short."""

    def __init__(self, cfg, run_dir: Path, mesh, loaded: Loaded, raw: dict):
        self.cfg, self.run_dir, self.mesh, self.raw = cfg, run_dir, mesh, raw
        self.on_cpu = mesh.devices.flat[0].platform == "cpu"
        self.roles, self.tokenizer = loaded.roles, loaded.tokenizer
        self.prompts, self.rewarder = loaded.prompts, loaded.rewarder
        tokenizer = loaded.tokenizer
        self.eos_ids = eos_ids_for(tokenizer, loaded.tok_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.P = RP.prompt_length(loaded.prompts)
        # Left-padded: the longest prompt's positions, then the generated ones.
        functional.check_positions(loaded.cfg, max(len(x) for x in loaded.prompts.ids)
                        + cfg.rollout.max_new_tokens,
                        "the longest prompt (data.max_prompt_len) + rollout.max_new_tokens")
        # The rollout rows this process samples, decodes and scores (all with one process).
        self.rows = distributed.process_rows(mesh, cfg.rollout.rows)
        # The forwards' layout (`groups.py`): grouped where exact and cheaper. The rollout's
        # forwards need only group-major rows; the update also needs whole groups per micro batch.
        G, N, policy_cfg = cfg.rollout.num_generations, cfg.rollout.max_new_tokens, loaded.cfg
        self.rollout_group = groups.group_size(policy_cfg, self.P, N, G, G)
        self.rounded = rounds_stochastically(policy_cfg.dtype, policy_cfg.param_dtype,
                                             cfg.train.stochastic_rounding)
        self.obj = objectives.Settings.of(cfg, groups.group_size(
            policy_cfg, self.P, N, G, cfg.minibatch_rows // cfg.train.grad_accum))
        self.mem = PhaseMemory()
        self.sampling = R.Sampling(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=float(cfg.rollout.temperature),
            top_p=float(cfg.rollout.top_p), top_k=cfg.rollout.top_k, eos_ids=self.eos_ids,
            pad_id=int(self.pad_id), decode_scan_layers=cfg.rollout.decode_scan_layers,
            decode_dtype=cfg.rollout.decode_dtype,
            logits_chunk=cfg.train.logits_chunk, min_new_tokens=cfg.rollout.min_new_tokens)
        self.stream = RP.PromptStream(len(loaded.prompts.ids), cfg.rollout.batch_size,
                                     seed=cfg.data.seed, shuffle=cfg.data.shuffle)
        # The coefficient of the objective's KL term (traced into the advantages; logged).
        self.kl_coef = cfg.ppo.kl_coef if cfg.objective.kl_in_reward else cfg.grpo.beta
        self.heldout = None
        if loaded.eval_prompts is not None and cfg.train.eval_every:
            self.heldout = H.HeldOut(cfg, run_dir, mesh, loaded.roles, tokenizer, loaded.rewarder,
                                     self.sampling, self.rows, loaded.eval_prompts)

    # -- programs ---------------------------------------------------------------------------
    def _compile(self, state):
        cfg, mesh, roles = self.cfg, self.mesh, self.roles
        self.mem.end("load")   # the roles, the state: resident before anything compiles
        rep, bsh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        rows, N, mb = cfg.rollout.rows, cfg.rollout.max_new_tokens, cfg.minibatch_rows
        i32, f32 = jnp.int32, jnp.float32
        sds = lambda shape, dt, sh=bsh: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
        train_sh = jax.tree.map(lambda x: x.sharding, state.params)
        frozen_sh = jax.tree.map(lambda x: x.sharding, roles.frozen)
        aux_sh = jax.tree.map(lambda x: x.sharding, roles.aux)
        models, sampling, obj = roles.models, self.sampling, self.obj
        # The loss never sees the reward model: keep it out of the train step's cache key.
        loss_models = dataclasses.replace(models, reward=None)

        G, group = cfg.rollout.num_generations, self.rollout_group
        own = not obj.reuse_old_logp   # the rollout's own policy forward (`objectives.reuses`)
        self.rollout_fn = compiled(
            ("rollout", models, sampling, G, group, own),
            lambda: jax.jit(lambda *a: R.rollout(models, sampling, *a, generations=G, group=group,
                                                 policy_logp=own),
                            in_shardings=(train_sh, frozen_sh, aux_sh, bsh, bsh, rep),
                            out_shardings=bsh),
            abstract(state.params), abstract(roles.frozen), abstract(roles.aux),
            sds((rows, self.P), i32), sds((rows, self.P), i32), sds((2,), jnp.uint32, rep))
        exp_abs = {"mask_BN": sds((rows, N), i32), "old_logp_BN": sds((rows, N), f32),
                   "ref_logp_BN": sds((rows, N), f32), "values_BN": sds((rows, N), f32),
                   "lengths_B": sds((rows,), i32)}
        self.adv_fn = compiled(
            ("advantages", obj),
            lambda: jax.jit(lambda *a: objectives.advantages(obj, *a),
                            out_shardings=self._adv_shardings(bsh, rep)),
            exp_abs, sds((rows,), f32), sds((), f32, rep))
        optimizer, schedule = make_optimizer(cfg.optim, cfg.total_steps)
        def batch_abs(n, P, N):
            width = lambda k: (P,) if k.endswith("_BP") else (N,) if k.endswith("_BN") else ()
            return {k: sds((n, *width(k)), i32 if k in (
                "prompt_BP", "prompt_mask_BP", "response_BN", "mask_BN") else f32)
                for k in objectives.TRAIN_KEYS}
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        # A constant schedule (after warmup) does not depend on the run's length.
        span = 0 if cfg.optim.schedule == "constant" else cfg.total_steps

        def update_programs(P, N):
            """(trim, take, train step) for a rollout trimmed to P prompt / N response slots:
            compiled once per bucket (`compiled` caches them)."""
            # A minibatch is gathered on the devices from the global rollout: any rows,
            # whichever process sampled them, exactly as one process would pick them.
            trim = compiled(("trim", P, N), lambda: jax.jit(lambda b: groups.trim(b, P, N),
                                                            out_shardings=bsh),
                            batch_abs(rows, self.P, cfg.rollout.max_new_tokens))
            take = compiled(("take",), lambda: jax.jit(lambda b, r: jax.tree.map(lambda x: x[r], b),
                                                       out_shardings=bsh),
                            batch_abs(rows, P, N), sds((mb,), i32, rep))
            step = compiled(
                ("train", loss_models, obj, cfg.optim, span, cfg.train.grad_accum, self.rounded),
                lambda: jit_train_step(make_train_step(objectives.make_loss_fn(loss_models, obj),
                                                       optimizer, schedule,
                                                       grad_accum=cfg.train.grad_accum,
                                                       round_weights=self.rounded),
                                       state_sh, frozen_sh, bsh),
                abstract(state), abstract(roles.frozen), batch_abs(mb, P, N))
            return trim, take, step

        self.update_programs = update_programs
        # After a rollout's first step, its log-probs become the old ones
        # (`objectives.first_forward`); jitted on use, as the step's per-row outputs come in
        # whatever sharding XLA gave them.
        self.first_fn = jax.jit(lambda *a: objectives.first_forward(obj, *a),
                                out_shardings=(bsh, rep)) if obj.reuse_old_logp else None
        # The memory report and pre-flight see the largest shapes (nothing trimmed).
        _, _, full_step = update_programs(self.P, N)
        programs = {"rollout": self.rollout_fn, "advantages": self.adv_fn,
                    "train_step": full_step}
        if self.heldout is not None:
            programs["heldout"] = self.heldout.compile(state, compiled)
        # The compiler's and the loaders' freed memory back to the system, once: releasing
        # between every rollout and update as well cost ~1.5 s an iteration in page faults for
        # no lower peak (GRPO bench, docs/bench/README.md).
        self.mem.release()
        self.mem.end("compile")   # into the first iteration's perf record
        return programs

    # -- one iteration ------------------------------------------------------------------------
    def _adv_shardings(self, bsh, rep) -> dict:
        out = {"advantages_BN": bsh, "returns_BN": bsh}
        if not self.obj.reuse_old_logp:
            out.update(kl=rep, kl_token=rep)
        if self.obj.objective.needs_value:
            out["explained_variance"] = rep
        return out

    def _experience(self, state, it: int):
        """Rollout + rewards + advantages -> (device batch, metrics, samples). Touches no state
        except the reward moments, and those only after every reward function succeeded.

        Every process walks the same prompt stream; it samples, decodes and scores only its
        rows of the rollout (`self.rows`), then the per-row figures are exchanged
        (`hosts.exchange`) so that every process normalises and reports the whole rollout."""
        cfg, G = self.cfg, self.cfg.rollout.num_generations
        self.mem.start()
        idx = np.repeat(self.stream.next(), G)   # a prompt's group: consecutive rows
        faults.point("batch")
        mine = idx[self.rows]
        prompt_BP, mask_BP = RP.stack_prompts(self.prompts, mine, self.pad_id, self.P)
        key = jax.random.fold_in(jax.random.fold_in(state.rng, _ROLLOUT_SALT), it)
        rep = sharding.replicated(self.mesh)
        dev = put_batch({"p": prompt_BP, "m": mask_BP}, self.mesh)
        exp = self.rollout_fn(state.params, self.roles.frozen,
                              self.roles.aux, dev["p"], dev["m"],
                              jax.device_put(jnp.asarray(key, jnp.uint32), rep))
        faults.point("rollout")
        keys = hosts.HOST_KEYS + (() if self.obj.reuse_old_logp else hosts.FORWARD_KEYS)
        host = {k: distributed.local_rows(exp[k], self.rows) for k in keys}
        self.mem.end("rollout")
        lengths, eos = host["lengths_B"], R.has_eos(host["response_BN"], host["lengths_B"], self.eos_ids)
        completions = R.decode(self.tokenizer, host["response_BN"], lengths)
        texts = [self.prompts.texts[i] for i in mine]
        figures, error = None, None
        try:
            trl = TRLInputs([self.prompts.trl[i] for i in mine] if self.prompts.trl else [],
                            R.completion_ids(host["response_BN"], lengths),
                            TrainerState(it - 1, cfg.train.iterations))
            raw, parts = self.rewarder.raw_rows(texts, completions, host["rm_score_B"], eos,
                                                self.prompts.columns_of(mine), trl=trl)
            figures = hosts.row_figures(host, eos, raw, parts)
        except RewardFunctionError as e:
            error = str(e)
        first = range(self.rows.start, min(self.rows.stop, cfg.train.num_samples))
        shown = [{"row": r, "prompt": texts[r - self.rows.start],
                  "completion": completions[r - self.rows.start]} for r in first]
        g, extras, error = hosts.exchange(self.rows, len(idx), figures, shown, error)
        if error is not None:
            raise RewardFunctionError(error)
        if self.rewarder.cfg.model is None:
            # Functions only: NaN means no function applied (each returned None); such rows
            # take their group's mean in `normalise` (a non-finite value is refused per call).
            keep = np.ones(len(g["raw"]), bool)
        else:
            g, keep = hosts.finite_rows(g)
        if not keep.any():
            raise NonFiniteRewards(f"iteration {it}: every one of the {len(keep)} rollout rows "
                                   f"has a non-finite reward (reward model score "
                                   f"{g['raw'][0]}); nothing of it was applied")
        scores = self.rewarder.normalise(g["raw"], keep, group=G).astype(np.float32)
        adv_in = {k: exp[k] for k in ("mask_BN", "old_logp_BN", "ref_logp_BN", "values_BN",
                                      "lengths_B")}
        if not keep.all():   # dropped rows: zero weight in the advantages and the loss
            log.warning("iteration %d: %d of %d rollout rows had a non-finite reward; dropped",
                        it, int((~keep).sum()), len(keep))
            row_w = put_batch({"k": keep[self.rows].astype(np.int32)[:, None]}, self.mesh)["k"]
            adv_in["mask_BN"] = exp["mask_BN"] * row_w
            exp = {**exp, "mask_BN": adv_in["mask_BN"]}
        adv = self.adv_fn(adv_in, put_batch({"s": scores[self.rows]}, self.mesh)["s"],
                          jax.device_put(jnp.float32(self.kl_coef), rep))
        metrics = {**hosts.rollout_metrics(g), "score_mean": float(scores[keep].mean()),
                   "kl_coef": float(self.kl_coef)}
        if "kl" in adv:   # else from the update's first step
            metrics.update(kl=float(adv["kl"]), kl_token=float(adv["kl_token"]))
        if "explained_variance" in adv:
            metrics["explained_variance"] = float(adv["explained_variance"])
        if not keep.all():
            metrics["reward_dropped"] = float((~keep).sum())
        batch = {k: exp[k] for k in objectives.TRAIN_KEYS if k in exp}
        batch.update(advantages_BN=adv["advantages_BN"], returns_BN=adv["returns_BN"])
        # The update's forwards run on this rollout's own buckets: the longest prompt of the
        # batch (every process sees every row's prompt) and the longest response.
        P2, N2 = groups.buckets([len(self.prompts.ids[i]) for i in idx], g["lengths"], self.P,
                                cfg.rollout.max_new_tokens)
        batch = self.update_programs(P2, N2)[0](batch)
        self.sampler_logp = exp["sampler_logp_BN"]
        samples = [{"prompt": s["prompt"], "completion": s["completion"],
                    "reward": float(g["raw"][s["row"]]), "length": int(g["lengths"][s["row"]]),
                    "eos": bool(g["eos"][s["row"]])}
                   for s in sorted({s["row"]: s for x in extras for s in x}.values(),
                                   key=lambda s: s["row"])]
        self.mem.end("scoring")
        return batch, metrics, samples

    def _update(self, state, batch: dict, it: int, saved_at: int):
        """ppo.epochs x ppo.minibatches optimizer steps -> (state, averaged step metrics)."""
        cfg, G = self.cfg, self.obj.layout_group
        self.mem.start()
        _, take_fn, step_fn = self.update_programs(batch["prompt_BP"].shape[1],
                                                   batch["response_BN"].shape[1])
        # On the CPU, the step's temporaries freed before the next one's (runtime.settle_seconds).
        settle = runtime.settle_seconds(step_fn) if self.on_cpu else 0.0
        rng = np.random.default_rng([cfg.train.seed, it])
        records, epochs, skipped_before = [], 0, self.guard.skipped
        figures = {}
        for epoch in range(cfg.ppo.epochs):
            # Grouped layout: minibatches of whole groups (drawn in a seeded order as rows are).
            perm = rng.permutation(cfg.rollout.rows // G)
            epoch_records = []
            for m in range(cfg.ppo.minibatches):
                rows = perm[m * cfg.minibatch_rows // G:(m + 1) * cfg.minibatch_rows // G]
                if G > 1:
                    rows = groups.minibatch_rows(rows, G, cfg.train.grad_accum)
                picked = sharding.put_global(rows.astype(np.int32), sharding.replicated(self.mesh))
                state, out = step_fn(state, self.roles.frozen, take_fn(batch, picked))
                faults.point("step")
                rows_out = out.pop("rows", None)
                if self.first_fn is not None and epoch == 0:   # one minibatch: every row, once
                    batch, figures = self.first_fn(batch, picked, rows_out, self.sampler_logp)
                out = {k: float(v) for k, v in jax.device_get(out).items()}
                if settle:
                    time.sleep(settle)
                self.guard.check(out, it, saved_at)
                epoch_records.append(out)
            records += epoch_records
            epochs += 1
            approx_kl = float(np.mean([r["approx_kl"] for r in epoch_records]))
            if cfg.ppo.max_approx_kl is not None and approx_kl > cfg.ppo.max_approx_kl:
                log.info("iteration %d: epoch %d approx KL %.4g > ppo.max_approx_kl=%g; "
                         "stopping this rollout's epochs", it, epoch + 1, approx_kl,
                         cfg.ppo.max_approx_kl)
                break
        metrics = _mean_metrics(records)
        metrics.pop("finite", None)
        metrics.pop("weight", None)
        metrics["train_entropy"] = metrics.pop("entropy")
        metrics.update(epochs=float(epochs), skipped=float(self.guard.skipped - skipped_before))
        metrics.update({k: float(v) for k, v in jax.device_get(figures).items()})
        self.mem.end("update")
        return state, metrics

    def _monitors(self, metrics: dict, it: int) -> str | None:
        mon = self.cfg.monitor
        problems = []
        if mon.entropy_floor is not None and metrics["entropy"] < mon.entropy_floor:
            problems.append(f"entropy {metrics['entropy']:.4g} < monitor.entropy_floor={mon.entropy_floor}")
        if mon.kl_ceiling is not None and metrics["kl"] > mon.kl_ceiling:
            problems.append(f"KL {metrics['kl']:.4g} > monitor.kl_ceiling={mon.kl_ceiling}")
        if not problems:
            return None
        msg = f"iteration {it}: " + "; ".join(problems)
        if mon.action == "warn":
            log.warning("%s", msg)
            return None
        return msg

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, float]:
        cfg, run_dir = self.cfg, self.run_dir
        runtime.count_compilations()  # perf.jsonl shows any recompilation after warm-up
        optimizer, _ = make_optimizer(cfg.optim, cfg.total_steps)
        state, _, ckpts, start, meta = start_or_resume(run_dir, self.roles.trainable, optimizer,
                                                       cfg.train.seed, cfg.train.keep_checkpoints)
        if meta is not None:
            self.stream.restore(meta["prompts"])
            self.kl_coef = float(meta["kl_coef"])
            self.rewarder.moments = RunningMoments.from_state(meta["reward_moments"])
            if self.heldout is not None:
                self.heldout.tracker.restore(meta.get("heldout"))
        self.roles.trainable = None  # the state owns (and donates) the trainable params now
        check_memory(run_dir, self.mesh, self.roles, cfg, state, None, None)  # before compiling
        programs = self._compile(state)
        report = memory_report(run_dir, self.roles, cfg, nbytes(state.opt_state), programs)
        check_memory(run_dir, self.mesh, self.roles, cfg, state, programs, report)

        if jax.process_index() == 0:
            truncate_jsonl(run_dir / "samples.jsonl", start)
            truncate_jsonl(run_dir / "eval_samples.jsonl", start)
        last_it = cfg.train.iterations
        if self.heldout is not None and self.heldout.tracker.stopped:
            log.info("%s stopped early at iteration %d (train.early_stop_patience); nothing "
                     "left to run", run_dir, start)
            last_it = start
        # lag 0: an iteration waits on the device inside (decoding, each minibatch's flags).
        shell = Shell(run_dir, cfg.train, ckpts, start, cfg.train.iterations, unit="iteration",
                      fields=RECIPES["ppo"].progress, meta_of=self._meta, run_config=self.raw,
                      lag=0, eval_due=lambda it: self.heldout is not None and self.heldout.due(it),
                      evaluate=self._evaluate)
        self.guard = shell.guard
        return shell.run(state, self._iterate, end=last_it,
                         on_end=self._export if cfg.train.export_hf else None)

    def _iterate(self, shell: Shell, it: int, state) -> Outcome:
        """One iteration: rollout, rewards, advantages, updates, the KL controller."""
        cfg = self.cfg
        t0 = time.perf_counter()
        try:
            batch, metrics, samples = self._experience(state, it)
        except RewardFunctionError as e:
            # Nothing of this iteration was applied: keep the last completed one.
            raise RewardFunctionError(f"iteration {it}: {e}; {shell.keep_previous(it, state)}") \
                from e
        except NonFiniteRewards as e:
            # A bad step: skipped (no update, no KL / moments change) within
            # train.max_bad_steps, else the run stops naming the last checkpoint.
            shell.guard.bad(str(e), it, shell.saved_at)
            return Outcome(state, None)   # its prompts are used; the state is unchanged
        if shell.stop.requested():   # nothing of this rollout touched the state: drop it
            shell.abandon(it, state, "rollout")
        t1 = time.perf_counter()
        state, step_metrics = self._update(state, batch, it, shell.saved_at)
        metrics.update(step_metrics)
        if cfg.objective.kl_in_reward and cfg.ppo.kl_target is not None:
            self.kl_coef = adaptive_kl_update(
                self.kl_coef, metrics["kl"], cfg.rollout.rows,
                target=cfg.ppo.kl_target, horizon=cfg.ppo.kl_horizon)
        dt = time.perf_counter() - t0
        perf = {"iteration_s": dt, "rollout_s": t1 - t0, "update_s": dt - (t1 - t0),
                "tokens_per_s": metrics["response_length"] * cfg.rollout.rows / dt,
                **self.mem.take()}
        if cfg.train.sample_every and it % cfg.train.sample_every == 0:
            self._write_samples(it, samples)
        tripped = self._monitors(metrics, it)
        halt = None if tripped is None else MonitorStop(
            f"{tripped}; stopped (monitor.action=stop) with iteration {it} checkpointed in "
            f"{shell.ckpts.dir}")
        return Outcome(state, metrics, perf, halt=halt)

    def _meta(self, it: int) -> dict:
        meta = {"iteration": it, "step": it, "prompts": self.stream.state(),
                "kl_coef": self.kl_coef, "reward_moments": self.rewarder.moments.state()}
        if self.heldout is not None:
            meta["heldout"] = self.heldout.tracker.state()
        return meta

    def _evaluate(self, state, it: int, metrics: dict, perf: dict) -> bool:
        """The held-out evaluation when due (`heldout.py`): eval/ metrics into `metrics`,
        its time into `perf`; True when train.early_stop_patience says stop."""
        if self.heldout is None or not self.heldout.due(it):
            return False
        t0 = time.perf_counter()
        self.mem.start()
        metrics.update(self.heldout.evaluate(state, it, int(self.pad_id)))
        self.heldout.track(state, it, metrics)
        perf["eval_s"] = time.perf_counter() - t0
        self.mem.end("eval")
        perf.update(self.mem.take())
        return self.heldout.tracker.stopped

    def _write_samples(self, it: int, samples: list[dict]) -> None:
        if jax.process_index() == 0:   # every process holds the same samples: one writes
            for s in samples:
                log.info("sample @%d reward %.3f: %r -> %r", it, s["reward"], s["prompt"][-80:],
                         s["completion"][:200])
            with open(self.run_dir / "samples.jsonl", "a") as f:
                for s in samples:
                    f.write(json.dumps({"step": it, **s}, ensure_ascii=False) + "\n")

    def _export(self, state) -> None:
        write_merged(self.run_dir / "hf", self.roles.models.policy,
                  lora.combine(state.params["policy"], self.roles.frozen["policy"]),
                  self.roles.hf_config, self.roles.tok_dir)
