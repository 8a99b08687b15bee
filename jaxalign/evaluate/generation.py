"""Batch generation from a prompt file to JSONL (`jaxalign generate MODEL --prompts FILE`)
and for evaluation, on `jaxalign.generate`'s jitted sampler.

Every call sees `batch_size` rows (the last batch is filled with copies of its last prompt,
whose completions are dropped) and a prompt length from `bucket_length`, so a file compiles
the sampler once per length bucket, not once per batch.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

from jaxalign.data.config import DatasetSpec
from jaxalign.data.prompts import Prompts, load_prompts
from jaxalign.data.sources import DataError
from jaxalign.generate import encode_prompts, eos_ids_for, generate_ids

log = logging.getLogger("jaxalign.eval")


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def sample(cfg, params, prompt_ids: Sequence[Sequence[int]], *, batch_size: int,
           max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           seed: int = 0, eos_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Completion ids (up to and including EOS) of every prompt, `batch_size` at a time.
    Batch k samples with key seed + k * batch_size, so results do not depend on what other
    files were generated before."""
    out: list[list[int]] = []
    t0 = time.perf_counter()
    for start in range(0, len(prompt_ids), batch_size):
        chunk = [list(p) for p in prompt_ids[start:start + batch_size]]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        ids = generate_ids(cfg, params, padded, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + start,
                           eos_ids=eos_ids, pad_id=pad_id)
        out.extend(ids[:len(chunk)])
        log.debug("generated %d/%d (%.1fs)", len(out), len(prompt_ids), time.perf_counter() - t0)
    return out


def read_prompts(path: str | DatasetSpec, tokenizer, *, chat: bool | None,
                 chat_template: str | None = None, max_prompt_len: int | None = None,
                 cache_dir: str | None = None) -> Prompts:
    """A .txt file (one prompt a line, blank lines skipped) or any dataset `load_prompts`
    reads (rows with prompt / messages / chosen + rejected)."""
    spec = DatasetSpec(path=path) if isinstance(path, str) else path
    p = Path(spec.path).expanduser()
    if p.suffix.lower() != ".txt":
        return load_prompts(spec, tokenizer, chat=chat, chat_template=chat_template,
                            max_prompt_len=max_prompt_len, cache_dir=cache_dir)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    lines = [(n, line) for n, line in enumerate(p.read_text().splitlines()) if line.strip()]
    if not lines:
        raise DataError(f"{p}: no prompts (every line is blank)")
    texts = [line for _, line in lines]
    ids = encode_prompts(tokenizer, texts, chat=bool(chat))
    if max_prompt_len is not None:
        ids = [x[-max_prompt_len:] for x in ids]
    return Prompts(str(p), texts, ids, texts, [n for n, _ in lines], {})


def completion_rows(prompts: Prompts, ids: Sequence[Sequence[int]], tokenizer,
                    eos_ids: Sequence[int]) -> list[dict]:
    """One JSON row per prompt: prompt (the text a reader sees), completion (decoded, special
    tokens skipped), tokens (generated, EOS included), finished (EOS reached), then the prompt
    row's other columns (e.g. an `answer`)."""
    eos = set(eos_ids)
    rows = []
    for i, row_ids in enumerate(ids):
        row = {"prompt": prompts.texts[i],
               "completion": tokenizer.decode(row_ids, skip_special_tokens=True),
               "tokens": len(row_ids), "finished": bool(row_ids) and row_ids[-1] in eos}
        for k, v in prompts.columns.items():
            row.setdefault(k, v[i])
        rows.append(row)
    return rows


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    return path


def generate_file(cfg, params, tokenizer, prompts_path: str, *, chat: bool, batch_size: int,
                  max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = 0, seed: int = 0) -> list[dict]:
    """The completion rows of every prompt of a file (see `completion_rows`)."""
    prompts = read_prompts(prompts_path, tokenizer, chat=chat)
    eos = eos_ids_for(tokenizer)
    ids = sample(cfg, params, prompts.ids, batch_size=batch_size, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos_ids=eos,
                 pad_id=pad_id_of(tokenizer))
    return completion_rows(prompts, ids, tokenizer, eos)
