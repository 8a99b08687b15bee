"""`run_eval(cfg)`: every measurement whose inputs the config gives, for every named policy.

  ppl/<name>/*      token-weighted perplexity on data.heldout (every model, reference included)
  rm/*              the reward model's accuracy and margin on data.pairs
  dpo/<name>/*      DPO-implied reward beta * (log pi - log pi_ref) on data.pairs: accuracy, margin
  gen/<name>/*      completions of data.prompts: rouge_l and exact_match against the reference
                    answers (where rows have them), length, finished (EOS reached), reward
  winrate/<name>    P(reward(policy's completion) > reward(reference's)), ties counting one half
  kl/<name>/*       on the policy's completions: sum_t log pi(y_t) - log pi_ref(y_t), the
                    Monte-Carlo estimate of KL(pi || pi_ref) when sampled at temperature 1
                    (greedy completions give the same statistic, not an unbiased KL);
                    per sequence (mean over prompts) and per token
  lm_eval/<name>/<task>/<metric>   the optional harness task on an HF export of the policy
  <key>/ci_low, <key>/ci_high      the percentile bootstrap interval (eval.confidence,
                    eval.bootstrap resamples; `intervals.py`) of every metric above that is a
                    mean over prompts or pairs (not perplexity, per-token KL, lm_eval)
  diff/<a>/<b>/gen/<metric>[/ci_low|/ci_high]   policy a minus policy b on the same prompts
                    (every pair, later minus earlier: policy - reference), paired bootstrap

"Reference" is models.reference (e.g. the SFT policy); comparisons are of every other policy
against it. out_dir receives eval.json (these metrics, flat), eval_summary.json (a per-model
table, the models, the files), samples.jsonl (prompt, answer, each model's completion and
reward) and generations_<name>.jsonl (every completion); see `_write`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np

from jaxalign import checkpoint, rundir
from jaxalign.config import ConfigError, load_yaml
from jaxalign.data.config import DataConfig
from jaxalign.data.pipeline import resolve_template
from jaxalign.data.preference import PairSet, load_pairs
from jaxalign.data.tokenize import Encoder
from jaxalign.evaluate import harness, intervals, likelihood, text_metrics
from jaxalign.evaluate.config import REFERENCE, EvalConfig
from jaxalign.evaluate.generation import (pad_id_of, read_prompts, sample,
                                          write_jsonl)
from jaxalign.generate import eos_ids_for
from jaxalign.models import lora
from jaxalign.evaluate.judge import Judge, same_vocab
from jaxalign.tokenizer import load_tokenizer

log = logging.getLogger("jaxalign.eval")

ANSWER_FIELDS = ("answer", "reference", "completion")


@dataclasses.dataclass
class Model:
    name: str
    path: str
    cfg: object
    params: object
    tokenizer: object


def load(name: str, path: str, dtype: str) -> Model:
    # Scanned layers: the prefill and scoring programs stay small; decoding reads per-layer
    # weights either way (generate.py). LoRA adapters are merged: evaluation needs no split.
    cfg, params, _, tok_dir = checkpoint.load_model(path, None, dtype=dtype, scan_layers=True)
    if cfg.lora_rank:
        cfg, params = lora.merge(cfg, params)
    return Model(name, path, cfg, params, load_tokenizer(tok_dir))


def default_reference(policy: str) -> str:
    """A run directory's starting model (as its run.json records it, else its config's
    model.path); else the policy itself."""
    base = checkpoint.run_base(Path(policy).expanduser())
    if base and base[0]:
        return base[0]  # an absolute path or a hub id
    run_cfg = Path(policy).expanduser() / "config.yaml"
    if run_cfg.exists():
        return str(Path(load_yaml(str(run_cfg))["model"]["path"]).expanduser())
    return policy


def resolve_models(cfg: EvalConfig) -> tuple[dict[str, str], str | None]:
    """{name: path} of every model to run (reference first) and the reference's name."""
    models, ref = dict(cfg.models.policies), cfg.models.reference
    if ref is None and len(models) == 1:
        (path,) = models.values()
        start = default_reference(path)
        if start != path:
            ref = REFERENCE
            models = {REFERENCE: start, **models}
    elif ref is not None and ref not in models:
        models = {REFERENCE: ref, **models}
        ref = REFERENCE
    if ref is not None:
        models = {ref: models[ref], **{k: v for k, v in models.items() if k != ref}}
    return models, ref


def reference_answers(prompts, field: str | None) -> list[str | None]:
    """Each prompt's reference answer (None where a row has none): data.answer_field, else
    the first column of ANSWER_FIELDS present, else a chat row's last assistant turn."""
    cols = prompts.columns
    if field is not None:
        if field not in cols:
            raise ConfigError(f"data.answer_field: {prompts.name} has no column {field!r} "
                              f"(columns: {', '.join(sorted(cols)) or 'none'})")
        values = cols[field]
    elif found := [f for f in ANSWER_FIELDS if f in cols]:
        values = cols[found[0]]
    elif "messages" in cols:
        values = [next((m.get("content") for m in reversed(msgs or [])
                        if isinstance(m, dict) and m.get("role") == "assistant"), None)
                  for msgs in cols["messages"]]
    else:
        return [None] * len(prompts.ids)
    return [v if isinstance(v, str) else None for v in values]


def _load_prompts(cfg: EvalConfig, tok):
    d, o = cfg.data, cfg.eval
    texts, ids, answers, columns, as_given = [], [], [], [], []
    for spec in d.prompts:
        p = read_prompts(spec, tok, chat=d.chat, chat_template=d.chat_template,
                         max_prompt_len=o.max_prompt_len, cache_dir=d.cache_dir)
        texts += p.texts
        as_given += p.trl or p.texts   # a string or the message list: what a judge reads
        ids += p.ids
        answers += reference_answers(p, d.answer_field)
        columns += [{k: v[i] for k, v in p.columns.items()} for i in range(len(p.ids))]
    n = o.limit or len(ids)
    return texts[:n], ids[:n], answers[:n], columns[:n], as_given[:n]


def _load_pairs(cfg: EvalConfig, tok, template: str | None = "data") -> PairSet:
    """`template`: "data" for data.chat_template (the policies'), None for `tok`'s own (a
    reward model with its own tokenizer)."""
    template = cfg.data.chat_template if template == "data" else template
    data_cfg = DataConfig(train=cfg.data.pairs, seq_len=cfg.eval.seq_len, pack=False,
                          max_prompt_len=cfg.eval.max_prompt_len, cache_dir=cfg.data.cache_dir,
                          chat_template=template)
    encoder = Encoder(tok, chat_template=resolve_template(template))
    data = PairSet.concat("pairs", [load_pairs(s, data_cfg, encoder)[0] for s in cfg.data.pairs])
    return data.subset(range(min(len(data), cfg.eval.limit))) if cfg.eval.limit else data


def _accuracy(prefix: str, diff: np.ndarray, chosen: np.ndarray, rejected: np.ndarray,
              per_item: dict) -> dict:
    per_item.update({f"{prefix}/accuracy": (diff > 0).astype(np.float64), f"{prefix}/margin": diff})
    return {f"{prefix}/accuracy": float((diff > 0).mean()), f"{prefix}/margin": float(diff.mean()),
            f"{prefix}/chosen": float(chosen.mean()), f"{prefix}/rejected": float(rejected.mean()),
            f"{prefix}/pairs": float(len(diff))}


def _same_tokenizer(a: Model, b: Model, what: str) -> None:
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab():
        raise ConfigError(f"{what} ({b.path}): its tokenizer differs from {a.name}'s ({a.path}); "
                          f"the evaluation scores every model on the same tokens")


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    """Runs the evaluation; returns the flat metrics and, with out_dir, writes its files."""
    t0 = time.perf_counter()
    if cfg.out_dir:   # refused before minutes of evaluation if it is someone else's directory
        rundir.claim(cfg.out_dir, "eval")
    o, d = cfg.eval, cfg.data
    models, ref = resolve_models(cfg)
    if d.pairs and not (cfg.models.reward_model or (ref and len(models) > 1)):
        raise ConfigError("data.pairs: nothing to measure on them; give models.reward_model "
                          "and / or a models.reference to compare policies with")
    if cfg.lm_eval is not None:  # fail before minutes of evaluation, not after
        harness.require_lm_eval()
        harness.task_name(cfg.lm_eval.task_file, cfg.lm_eval.task)
    log.info("models: %s (reference: %s)", ", ".join(f"{k}={v}" for k, v in models.items()), ref)
    if ref is None and len(models) > 1:
        log.warning("models.reference is not set: no win rate, KL or DPO-implied accuracy "
                    "(name the baseline policy, e.g. reference: sft)")
    names = list(models)
    first = load(names[0], models[names[0]], o.dtype)
    tok, pad = first.tokenizer, pad_id_of(first.tokenizer)
    eos = eos_ids_for(tok)
    rm, judge = None, None
    if cfg.models.reward_model:
        rm = load("reward_model", cfg.models.reward_model, o.dtype)
        if not same_vocab(first.tokenizer, rm.tokenizer):   # TRL allows it: re-encode for it
            judge = Judge(rm.cfg, rm.params, rm.tokenizer, name=f"models.reward_model {rm.path}")
            log.info("models.reward_model (%s): its tokenizer differs from %s's; pairs are "
                     "tokenized and completions re-encoded with its own", rm.path, first.name)

    results: dict[str, float] = {}
    per_item: dict[str, np.ndarray] = {}   # metric -> its value per prompt / pair (intervals)
    texts, prompt_ids, answers, columns, as_given = (_load_prompts(cfg, tok) if d.prompts
                                                     else ([], [], [], [], []))
    pairs = _load_pairs(cfg, tok) if d.pairs else None
    heldout = likelihood.heldout_sets(d.heldout, tok, seq_len=o.seq_len,
                                      chat_template=d.chat_template, cache_dir=d.cache_dir,
                                      limit=o.limit) if d.heldout else []
    with_answer = [i for i, a in enumerate(answers) if a is not None]
    if d.prompts and not with_answer:
        log.info("prompts: no reference answers in the rows; no ROUGE-L / exact match")

    if rm is not None and pairs is not None:
        r = likelihood.pair_scores(rm.cfg, rm.params, _load_pairs(cfg, rm.tokenizer, None) if judge
                                   else pairs, seq_len=o.seq_len, batch_size=o.batch_size,
                                   pad_id=judge.pad_id if judge else pad)
        results.update(_accuracy("rm", r[:, 0] - r[:, 1], r[:, 0], r[:, 1], per_item))

    completions: dict[str, list[list[int]]] = {}
    rewards: dict[str, np.ndarray] = {}
    ref_model, ref_pairs = None, None
    for name in names:
        m = first if name == names[0] else load(name, models[name], o.dtype)
        if m is not first:
            _same_tokenizer(first, m, f"models.policies.{name}")
        t1 = time.perf_counter()
        if heldout:
            for k, v in likelihood.perplexity(m.cfg, m.params, heldout, seq_len=o.seq_len,
                                              batch_size=o.batch_size, pad_id=pad).items():
                results[f"ppl/{name}/{k}"] = v
        if pairs is not None and ref is not None and len(names) > 1:
            lp = likelihood.pair_logps(m.cfg, m.params, pairs, seq_len=o.seq_len,
                                       batch_size=o.batch_size, pad_id=pad)
            if name == ref:
                ref_pairs = lp
            else:
                reward = o.beta * (lp - ref_pairs)
                results.update(_accuracy(f"dpo/{name}", reward[:, 0] - reward[:, 1],
                                         reward[:, 0], reward[:, 1], per_item))
        if prompt_ids:
            ids = sample(m.cfg, m.params, prompt_ids, batch_size=o.batch_size,
                         max_new_tokens=o.max_new_tokens, temperature=o.temperature,
                         top_p=o.top_p, top_k=o.top_k, seed=o.seed, eos_ids=eos, pad_id=pad)
            completions[name] = ids
            results.update(_generation_metrics(name, ids, tok, answers, with_answer, eos, o,
                                               per_item))
            if judge is not None:
                rewards[name] = judge.score(as_given, tok.batch_decode(
                    ids, skip_special_tokens=True), batch_size=o.batch_size)
            elif rm is not None:
                rewards[name] = likelihood.rewards(rm.cfg, rm.params, prompt_ids, ids,
                                                   batch_size=o.batch_size, pad_id=pad)
            if rm is not None:
                results[f"gen/{name}/reward"] = float(rewards[name].mean())
                per_item[f"gen/{name}/reward"] = np.asarray(rewards[name], np.float64)
            if ref_model is not None:
                results.update(_comparisons(name, m, ref_model, prompt_ids, ids, rewards,
                                            ref, o.batch_size, pad, per_item))
        if name == ref:
            ref_model = m
        log.info("evaluated %s in %.1fs", name, time.perf_counter() - t1)

    if cfg.lm_eval is not None:
        for name in cfg.lm_eval.policies or list(cfg.models.policies):
            hf_dir = _hf_dir(name, models[name], cfg.out_dir)
            le = cfg.lm_eval
            task = harness.task_name(le.task_file, le.task)
            for k, v in harness.run_task(hf_dir, le.task_file, task, limit=le.limit,
                                         num_fewshot=le.num_fewshot,
                                         batch_size=le.batch_size).items():
                results[f"lm_eval/{name}/{task}/{k}"] = v
    diffs = []
    if o.bootstrap:
        kw = dict(resamples=o.bootstrap, confidence=o.confidence, seed=o.seed)
        results.update(intervals.with_intervals(per_item, **kw))
        diffs = intervals.differences({k: v for k, v in per_item.items() if k.startswith("gen/")},
                                      names, **kw)
        for d in diffs:
            key = f"diff/{d['a']}/{d['b']}/{d['metric']}"
            results.update({key: d["diff"], f"{key}/ci_low": d["ci_low"],
                            f"{key}/ci_high": d["ci_high"]})
    if cfg.out_dir:
        _write(Path(cfg.out_dir), cfg, models, ref, results, texts, answers, columns,
               completions, rewards, tok, eos, diffs)
    log.info("eval done in %.1fs", time.perf_counter() - t0)
    return results


def _generation_metrics(name, ids, tok, answers, with_answer, eos, o,
                        per_item: dict) -> dict[str, float]:
    """The means, and each prompt's value into `per_item` (the intervals' input)."""
    values = {f"gen/{name}/length": [len(x) for x in ids],
              f"gen/{name}/finished": [bool(x) and x[-1] in eos for x in ids]}
    if with_answer:
        preds = [tok.decode(ids[i], skip_special_tokens=True) for i in with_answer]
        refs = [answers[i] for i in with_answer]
        values[f"gen/{name}/rouge_l"] = text_metrics.rouge_l(preds, refs,
                                                            use_stemmer=o.rouge_stemmer)
        values[f"gen/{name}/exact_match"] = text_metrics.exact_match(preds, refs)
    per_item.update({k: np.asarray(v, np.float64) for k, v in values.items()})
    out = {f"gen/{name}/prompts": float(len(ids))}
    out.update({k: text_metrics.mean(v) for k, v in values.items()})
    if with_answer:
        out[f"gen/{name}/answers"] = float(len(with_answer))
    return out


def _comparisons(name, m: Model, ref_model: Model, prompt_ids, ids, rewards, ref, batch_size,
                 pad, per_item: dict) -> dict[str, float]:
    out = {}
    lp_pol, n = likelihood.completion_logps(m.cfg, m.params, prompt_ids, ids,
                                            batch_size=batch_size, pad_id=pad)
    lp_ref, _ = likelihood.completion_logps(ref_model.cfg, ref_model.params, prompt_ids, ids,
                                            batch_size=batch_size, pad_id=pad)
    kl = lp_pol - lp_ref
    out[f"kl/{name}/sequence"] = float(kl.mean())
    per_item[f"kl/{name}/sequence"] = np.asarray(kl, np.float64)
    out[f"kl/{name}/per_token"] = float(kl.sum() / max(float(n.sum()), 1.0))
    if name in rewards and ref in rewards:
        r_pol, r_ref = rewards[name], rewards[ref]
        wins = (r_pol > r_ref) + 0.5 * (r_pol == r_ref)
        out[f"winrate/{name}"] = float(wins.mean())
        per_item[f"winrate/{name}"] = wins.astype(np.float64)
    return out


def _hf_dir(name: str, path: str, out_dir: str | None) -> Path:
    """An HF directory of the policy for the harness: itself, its run's hf/ export, or a
    fresh export (LoRA merged) into out_dir/hf/<name>."""
    p = Path(path).expanduser()
    for cand in (p, p / "hf"):
        if (cand / "config.json").is_file() and any(cand.glob("*.safetensors")):
            return cand
    if not out_dir:
        raise ConfigError(f"lm_eval: {name} ({path}) is not an HF directory; set out_dir so "
                          f"that it can be exported there")
    from jaxalign.convert import hf
    cfg, params, hf_config, src = checkpoint.load_model(p)
    cfg, params = lora.merge(cfg, params)
    return Path(hf.save(Path(out_dir) / "hf" / name, cfg, params, hf_config=hf_config,
                        source_dir=src))


def _write(out: Path, cfg, models, ref, results, texts, answers, columns, completions,
           rewards, tok, eos, diffs=()) -> None:
    """eval.json: the flat metrics (what stdout gets); eval_summary.json: the per-model table
    (each mean with its <metric>/ci_low and /ci_high), the paired differences, models,
    reference and files; samples.jsonl: one flat row per prompt (prompt, answer,
    completion/<name>, reward/<name>), for report tables; generations_<name>.jsonl: every
    completion of one model with its prompt row's columns."""
    out.mkdir(parents=True, exist_ok=True)
    files: dict = {"metrics": "eval.json", "generations": {}}
    decoded = {name: [tok.decode(x, skip_special_tokens=True) for x in ids]
               for name, ids in completions.items()}
    for name, ids in completions.items():
        rows = [{"prompt": texts[i], "completion": decoded[name][i], "tokens": len(x),
                 "finished": bool(x) and x[-1] in eos, "answer": answers[i],
                 **({"reward": float(rewards[name][i])} if name in rewards else {}),
                 **{k: v for k, v in columns[i].items()
                    if k not in ("prompt", "completion", "answer", "reward")}}
                for i, x in enumerate(ids)]
        path = write_jsonl(out / f"generations_{name}.jsonl", rows)
        files["generations"][name] = path.name
    if completions:
        n = cfg.eval.samples or len(texts)
        samples = []
        for i in range(min(n, len(texts))):
            row = {"prompt": texts[i], "answer": answers[i]}
            row.update({f"completion/{k}": v[i] for k, v in decoded.items()})
            row.update({f"reward/{k}": float(v[i]) for k, v in rewards.items()})
            samples.append(row)
        files["samples"] = write_jsonl(out / "samples.jsonl", samples).name
    table: dict[str, dict[str, float]] = {name: {} for name in models}
    for key, value in results.items():
        parts = key.split("/")
        if len(parts) >= 2 and parts[1] in table and parts[0] != "diff":
            table[parts[1]]["/".join([parts[0], *parts[2:]])] = value
    summary = {"table": table, "differences": list(diffs), "models": models, "reference": ref,
               "reward_model": cfg.models.reward_model, "files": files,
               "settings": dataclasses.asdict(cfg.eval)}
    (out / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "eval_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
