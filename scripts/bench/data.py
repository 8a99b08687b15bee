"""The data of a train workload: a generated file the CLI reads, the CLI config that reads it,
and, for the TRL side, the very token ids the CLI trains on (built by jaxalign's own pipeline
from the same file and config, so both sides get the same rows in the same order).

Rows are long enough to fill every sequence: text of >= seq_len words (a word is at least
one token), truncated by the pipeline to exactly seq_len tokens, so neither side pads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_WORDS = ("the of and to in is was for on that with as by at from his her they this which "
          "be or an are had not but were all have one their has there been more some would "
          "what when who will out up can about into time other only new these two may first "
          "water people city world river house music school state light power market garden "
          "system number answer question color green blue red sea stone bread window paper "
          "plus minus times three seven eleven forty ninety quickly slowly under over again").split()

REWARD = "jaxalign.rewards:arithmetic"


def _text(rng, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS, n_words))


def write_text_rows(path: Path, n: int, seq: int) -> Path:
    rng = np.random.default_rng(0)
    path.write_text("".join(json.dumps({"text": _text(rng, seq + 8)}) + "\n" for _ in range(n)))
    return path


def write_pairs(path: Path, n: int, prompt_len: int, response_len: int) -> Path:
    rng = np.random.default_rng(0)
    rows = [{"prompt": _text(rng, prompt_len + 8), "chosen": _text(rng, response_len + 8),
             "rejected": _text(rng, response_len + 8)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(path: Path, n: int) -> Path:
    """Arithmetic tasks as user turns (the reward function checks the answer)."""
    from jaxalign.synth.tasks import make_tasks, prompt_of
    rows = make_tasks(n, seed=0, kinds=("arithmetic",))
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": prompt_of(r)}]})
                            + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- CLI configs

def cli_config(workload: str, a, model: str, tmp: Path) -> tuple[str, dict]:
    """(CLI command, YAML config) of a train workload: only what a user running this job sets
    (model, data, shapes, steps, lr = TRL's default, precision, LoRA); the CLI's defaults for
    the rest. `a`: the bench's settings (argparse namespace)."""
    n = a.warmup + a.steps
    model_cfg = {"path": model, "dtype": "bfloat16" if a.precision == "bf16" else "float32"}
    if workload in ("sft", "sft-lora"):
        data = {"train": [{"path": str(write_text_rows(tmp / "text.jsonl", n * a.batch, a.seq)),
                           "format": "text"}], "seq_len": a.seq}
        raw = {"model": model_cfg, "data": data, "train": {"steps": n, "batch_size": a.batch},
               "optim": {"lr": 2e-5}}
        if workload == "sft-lora":
            raw["lora"] = {"rank": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}
        return "sft", raw
    if workload in ("dpo", "rm"):
        pairs = write_pairs(tmp / "pairs.jsonl", n * a.batch, a.prompt_len, a.response_len)
        data = {"train": [{"path": str(pairs), "format": "preference"}],
                "seq_len": a.prompt_len + a.response_len, "max_prompt_len": a.prompt_len}
        return workload, {"model": model_cfg, "data": data, "train": {"steps": n, "batch_size": a.batch},
                          "optim": {"lr": 1e-6 if workload == "dpo" else 1e-4}}
    if workload in ("grpo", "ppo"):
        rows = a.batch * a.generations
        prompts = write_prompts(tmp / "prompts.jsonl", n * rows)
        rollout = ({"batch_size": a.batch, "num_generations": a.generations} if workload == "grpo"
                   else {"batch_size": rows})
        # EOS banned until the length on both sides (TRL: generation_kwargs min_new_tokens), so
        # every iteration trains on the same number of response tokens on each side.
        rollout.update(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
        return "ppo", {"algorithm": workload, "model": model_cfg,
                       "data": {"prompts": str(prompts), "chat": True, "shuffle": False},
                       "rollout": rollout, "reward": {"functions": [REWARD]},
                       "train": {"iterations": n}, "optim": {"lr": 1e-6}}
    raise ValueError(workload)


# ----------------------------------------------------------------------------- the CLI's rows

def cli_batches(command: str, raw: dict, n: int) -> list[dict]:
    """The first n host batches the CLI trains on, from jaxalign's data pipeline."""
    from jaxalign.config import from_dict
    from jaxalign.tokenizer import load_tokenizer
    raw = dict(raw, out_dir="unused")
    if command == "sft":
        from jaxalign.data.pipeline import build_sft_data
        from jaxalign.train.sft import SFTConfig
        cfg = from_dict(SFTConfig, raw)
        build = build_sft_data
    else:
        from jaxalign.data.preference import build_preference_data
        from jaxalign.train.dpo import DPOConfig
        cfg = from_dict(DPOConfig, raw)
        build = build_preference_data
    loader = build(cfg.data, load_tokenizer(cfg.model.path), batch_size=cfg.train.batch_size).train
    return [next(loader) for _ in range(n)]


def sft_rows(batches: list[dict]) -> list[list[int]]:
    """Each row's token ids (one example per row: the data is not packed)."""
    out = []
    for b in batches:
        for tokens_T, seg_T in zip(b["tokens"], b["segment_ids"]):
            out.append(tokens_T[seg_T > 0].tolist())
    return out


def pair_rows(batches: list[dict]) -> list[dict]:
    """{prompt_ids, chosen_ids, rejected_ids} of each pair (TRL's processed-dataset columns)."""
    out = []
    for b in batches:
        for tokens_2T, seg_2T, p in zip(b["tokens"], b["segment_ids"], b["prompt_len"]):
            chosen, rejected = (t[s > 0].tolist() for t, s in zip(tokens_2T, seg_2T))
            assert chosen[:p] == rejected[:p], "the pair's sides do not share the prompt"
            out.append({"prompt_ids": chosen[:p], "chosen_ids": chosen[p:], "rejected_ids": rejected[p:]})
    return out
