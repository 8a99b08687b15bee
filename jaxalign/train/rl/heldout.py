"""Held-out evaluation inside an RL run: what the reward cannot see.

Every `train.eval_every` iterations (after that iteration's update) the live policy completes
every prompt of `data.eval_prompts`, greedy (`train.eval_temperature` 0) or sampled at a set
temperature, in batches of the rollout's rows through one jitted program
(`rollout.sample_and_score`: the sampler and the reward model's score). On the host each
completion is scored by the run's reward sources (model and functions, unnormalised: the
running moments are not touched), against the prompt's reference answer where the row has
one (exact match and ROUGE-L, `jaxalign.evaluate.text_metrics`, the answer column found as
`jaxalign eval` finds it), and by length and EOS. The means are logged in metrics.jsonl at
that iteration under `eval/` (eval/reward, eval/reward/<source>, eval/exact_match,
eval/rouge_l, eval/length, eval/eos_rate) and every completion in eval_samples.jsonl.

`train.best_metric` (`best_mode` max or min) keeps the policy of the best evaluation in
run_dir/best: a run directory of its own (run.json, model/, checkpoints/), so `jaxalign
export RUN/best` and `jaxalign eval` read it like any run; best.json names its iteration and
value. `train.early_stop_patience` N stops the run, checkpointed, after N evaluations in a
row without a new best (a rerun of the command then finds it finished).

Resume stays byte-exact: the evaluation's key is derived from train.seed and the iteration
(never from the TrainState's RNG, which it leaves as it is), its programs touch no state, and
the best value, its iteration, the evaluations since and the stop flag are saved in the
checkpoint's JSON (`Tracker.state`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import distributed, sharding
from jaxalign.checkpoint import RUN_MARKER, TrainCheckpoints
from jaxalign.config import JaxalignError
from jaxalign.data.prompts import Prompts, load_prompts
from jaxalign.evaluate import text_metrics
from jaxalign.evaluate.run import reference_answers
from jaxalign.train.loop import abstract, put_batch
from jaxalign.train.rl import hosts, prompts as RP, rollout as R
from jaxalign.train.rl.rewards import RewardFunctionError, TrainerState, TRLInputs, nanmean

log = logging.getLogger(__name__)

_EVAL_SALT = 0xE7A1


def read_eval_prompts(cfg, tokenizer) -> Prompts:
    """data.eval_prompts under the training prompts' rendering and length rule."""
    return load_prompts(cfg.data.eval_prompts, tokenizer, chat=cfg.data.chat,
                        max_prompt_len=cfg.data.max_prompt_len, too_long="drop")


@dataclasses.dataclass
class Tracker:
    """Best-so-far and patience; its state is JSON in the run's checkpoint."""
    metric: str | None
    mode: str = "max"
    patience: int = 0
    best: float | None = None
    best_iteration: int = 0
    since_best: int = 0
    stopped: bool = False

    def update(self, value: float, it: int) -> bool:
        """Records an evaluation; True when it is a new best (NaN never is)."""
        better = (math.isfinite(value) and (
            self.best is None or (value > self.best if self.mode == "max" else value < self.best)))
        if better:
            self.best, self.best_iteration, self.since_best = value, it, 0
        else:
            self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stopped = True
        return better

    def state(self) -> dict:
        return {"best": self.best, "best_iteration": self.best_iteration,
                "since_best": self.since_best, "stopped": self.stopped}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best, self.best_iteration = state["best"], int(state["best_iteration"])
            self.since_best, self.stopped = int(state["since_best"]), bool(state["stopped"])


class HeldOut:
    """The held-out evaluation of one run (see the module docstring)."""

    def __init__(self, cfg, run_dir: Path, mesh, roles, tokenizer, rewarder,
                 sampling: R.Sampling, rows: slice, prompts: Prompts):
        self.cfg, self.run_dir, self.mesh, self.roles = cfg, run_dir, mesh, roles
        self.tokenizer, self.rewarder, self.rows, self.prompts = tokenizer, rewarder, rows, prompts
        # The model as users get it: no EOS ban (rollout.min_new_tokens is for training rollouts).
        self.sampling = dataclasses.replace(sampling, temperature=float(cfg.train.eval_temperature),
                                            min_new_tokens=0)
        self.P = RP.prompt_length(prompts)
        self.answers = reference_answers(prompts, cfg.data.answer_field)
        t = cfg.train
        self.tracker = Tracker(t.best_metric, t.best_mode, t.early_stop_patience)
        self.fn = None
        log.info("held-out evaluation: %d prompts (%d with reference answers) every %d "
                 "iterations, %s", len(prompts.ids), sum(a is not None for a in self.answers),
                 t.eval_every, "greedy" if not t.eval_temperature
                 else f"temperature {t.eval_temperature}")

    def due(self, it: int) -> bool:
        return it % self.cfg.train.eval_every == 0

    def compile(self, state, compile_fn: Callable):
        """The program, through the driver's compile cache (`programs.compiled`)."""
        models, sampling, roles = self.roles.models, self.sampling, self.roles
        rep, bsh = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
        sh = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
        rows = self.cfg.rollout.rows
        sds = lambda shape, dt, s=bsh: jax.ShapeDtypeStruct(shape, dt, sharding=s)
        self.fn = compile_fn(
            ("heldout", models, sampling),
            lambda: jax.jit(lambda *a: R.sample_and_score(models, sampling, *a),
                            in_shardings=(sh(state.params), sh(roles.frozen), sh(roles.aux),
                                          bsh, bsh, rep), out_shardings=bsh),
            abstract(state.params), abstract(roles.frozen), abstract(roles.aux),
            sds((rows, self.P), jnp.int32), sds((rows, self.P), jnp.int32),
            sds((2,), jnp.uint32, rep))
        return self.fn

    # -- one evaluation ------------------------------------------------------------------------
    def _batch(self, state, it: int, b: int, idx: list[int], pad_id: int):
        """Batch b (prompt indices idx, padded to the rollout's rows with copies of the last)
        -> (every row's figures, every row's sample), rows past len(idx) dropped."""
        rows = self.cfg.rollout.rows
        padded = np.asarray(idx + [idx[-1]] * (rows - len(idx)))
        mine = padded[self.rows]
        prompt_BP, mask_BP = RP.stack_prompts(self.prompts, mine, pad_id, self.P)
        dev = put_batch({"p": prompt_BP, "m": mask_BP}, self.mesh)
        # Its own key from train.seed: the training RNG stream is never drawn from here.
        key = jax.random.PRNGKey(self.cfg.train.seed)
        for salt in (_EVAL_SALT, it, b):
            key = jax.random.fold_in(key, salt)
        out = self.fn(state.params, self.roles.frozen, self.roles.aux, dev["p"], dev["m"],
                      jax.device_put(jnp.asarray(key, jnp.uint32), sharding.replicated(self.mesh)))
        host = {k: distributed.local_rows(out[k], self.rows) for k in out}
        lengths = host["lengths_B"]
        eos = R.has_eos(host["response_BN"], lengths, self.sampling.eos_ids)
        ids = R.completion_ids(host["response_BN"], lengths)
        completions = R.decode(self.tokenizer, host["response_BN"], lengths)
        texts = [self.prompts.texts[i] for i in mine]
        answers = [self.answers[i] for i in mine]
        figures, error = None, None
        try:
            trl = TRLInputs([self.prompts.trl[i] for i in mine] if self.prompts.trl else [], ids,
                            TrainerState(it, self.cfg.train.iterations))
            raw, parts = self.rewarder.raw_rows(texts, completions, host["rm_score_B"], eos,
                                                self.prompts.columns_of(mine), trl=trl)
            has = [a is not None for a in answers]
            pred = [c for c, h in zip(completions, has) if h]
            ref = [a for a in answers if a is not None]
            em = iter(text_metrics.exact_match(pred, ref))
            rl = iter(text_metrics.rouge_l(pred, ref) if pred else [])
            figures = {"raw": raw, "lengths": lengths, "eos": eos,
                       "exact": [float(next(em)) if h else math.nan for h in has],
                       "rouge": [float(next(rl)) if h else math.nan for h in has],
                       **{f"part:{k}": v for k, v in parts.items()}}
        except RewardFunctionError as e:
            error = f"held-out evaluation at iteration {it}: {e}"
        shown = [{"row": self.rows.start + r, "prompt": texts[r], "completion": completions[r],
                  "answer": answers[r]} for r in range(len(mine))
                 if self.rows.start + r < len(idx)]
        g, extras, error = hosts.exchange(self.rows, rows, figures, shown, error)
        if error is not None:
            raise RewardFunctionError(error)
        samples = sorted({s["row"]: s for x in extras for s in x}.values(), key=lambda s: s["row"])
        for s in samples:
            s["reward"] = float(g["raw"][s.pop("row")])
        return {k: v[:len(idx)] for k, v in g.items()}, samples

    def evaluate(self, state, it: int, pad_id: int) -> dict[str, float]:
        """-> the eval/ metrics of the policy in `state` (and eval_samples.jsonl rows)."""
        rows, n = self.cfg.rollout.rows, len(self.prompts.ids)
        parts, samples = [], []
        for b, start in enumerate(range(0, n, rows)):
            g, s = self._batch(state, it, b, list(range(start, min(start + rows, n))), pad_id)
            parts.append(g)
            samples += s
        g = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        out = {"eval/reward": nanmean(g["raw"]), "eval/length": float(g["lengths"].mean()),
               "eval/eos_rate": float(g["eos"].mean())}
        out.update({f"eval/{k[len('part:'):]}": nanmean(v) for k, v in g.items()
                    if k.startswith("part:")})
        if not np.isnan(g["exact"]).all():
            out["eval/exact_match"] = nanmean(g["exact"])
            out["eval/rouge_l"] = nanmean(g["rouge"])
        if jax.process_index() == 0:
            with open(self.run_dir / "eval_samples.jsonl", "a") as f:
                for s in samples:
                    f.write(json.dumps({"step": it, **s}, ensure_ascii=False) + "\n")
        return out

    def track(self, state, it: int, metrics: dict) -> None:
        """Best-so-far, the best policy kept, patience counted (train.best_metric)."""
        metric = self.tracker.metric
        if metric is None:
            return
        if metric not in metrics:
            raise JaxalignError(f"train.best_metric {metric!r} is not among this run's eval "
                                f"metrics ({', '.join(sorted(metrics))})")
        value = metrics[metric]
        if self.tracker.update(value, it):
            self._save_best(state, it, value)
            log.info("iteration %d: %s %.4g, a new best; kept in %s", it, metric, value,
                     self.run_dir / "best")
        elif self.tracker.stopped:
            log.info("iteration %d: %s %.4g, no new best for %d evaluations "
                     "(train.early_stop_patience); best %.4g at iteration %d: stopping", it,
                     metric, value, self.tracker.since_best, self.tracker.best,
                     self.tracker.best_iteration)

    def _save_best(self, state, it: int, value: float) -> None:
        best = self.run_dir / "best"
        if jax.process_index() == 0:
            # A run resumed from an earlier checkpoint may find bests from its first life past
            # this iteration: they are replaced (a deterministic replay finds them again).
            steps = best / "checkpoints"
            for path in list(steps.iterdir()) if steps.is_dir() else []:
                if path.is_dir() and path.name.isdigit() and int(path.name) >= it:
                    shutil.rmtree(path)
            best.mkdir(parents=True, exist_ok=True)
            for name in (RUN_MARKER, "config.yaml"):   # what makes a directory a run
                if (self.run_dir / name).exists():
                    shutil.copy(self.run_dir / name, best / name)
            if (self.run_dir / "model").is_dir() and not (best / "model").exists():
                shutil.copytree(self.run_dir / "model", best / "model")
        ckpts = TrainCheckpoints(best, keep=1)
        try:
            ckpts.save(it, {"params": {"policy": state.params["policy"]}},
                       {"iteration": it, "metric": self.tracker.metric, "value": value})
        finally:
            ckpts.close()
        if jax.process_index() == 0:
            (best / "best.json").write_text(json.dumps(
                {"iteration": it, "metric": self.tracker.metric, "value": value,
                 "mode": self.tracker.mode}, indent=1) + "\n")
