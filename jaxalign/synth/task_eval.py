"""Running a model on jaxalign's task rows (`jaxalign.synth.tasks`): greedy completions and
exact-match accuracy. The generator and the scoring stay model-free in `tasks`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

from jaxalign import checkpoint, generate
from jaxalign.synth.tasks import prompt_of, score_rows
from jaxalign.tokenizer import load_tokenizer

log = logging.getLogger("jaxalign.tasks")


def generate_completions(cfg, params, tokenizer, prompts: Sequence[str], *, batch_size: int = 16,
                         max_new_tokens: int = 32, chat: bool = True) -> list[str]:
    """Greedy completions of the prompts, `batch_size` at a time.

    The last batch is padded with copies of its last prompt, so every call has the same batch
    shape and (per prompt-length bucket) compiles once.
    """
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        t0 = time.perf_counter()
        texts = generate.generate_text(cfg, params, tokenizer, padded, chat=chat,
                                       max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                                       top_k=0, seed=0)
        out.extend(texts[:len(chunk)])
        log.info("generated %d/%d in %.1fs", len(out), len(prompts), time.perf_counter() - t0)
    return out


def evaluate_params(cfg, params, tokenizer, rows: Sequence[dict], *, batch_size: int = 16,
                    max_new_tokens: int = 32) -> dict:
    """Greedy exact-match accuracy of a loaded model on task rows; adds `completions`."""
    completions = generate_completions(cfg, params, tokenizer, [prompt_of(r) for r in rows],
                                       batch_size=batch_size, max_new_tokens=max_new_tokens)
    return {**score_rows(rows, completions), "completions": completions}


def evaluate(model_path: str | Path, rows: Sequence[dict], *, batch_size: int = 16,
             max_new_tokens: int = 32, limit: int | None = None, dtype: str | None = None) -> dict:
    """Loads a model (HF dir or jaxalign checkpoint) and its tokenizer, then `evaluate_params`
    on the first `limit` rows. Adds `seconds` (load + compile + generation)."""
    t0 = time.perf_counter()
    rows = list(rows)[:limit] if limit is not None else list(rows)
    if not rows:
        raise ValueError("no rows to evaluate")
    # Decoding is memory-bound: scanned layers decode faster on CPU and compile sooner
    # (see cli.cmd_generate).
    runtime = {"scan_layers": True} | ({"dtype": dtype} if dtype else {})
    cfg, params, _, tok_dir = checkpoint.load_model(model_path, **runtime)
    tokenizer = load_tokenizer(tok_dir)
    result = evaluate_params(cfg, params, tokenizer, rows, batch_size=batch_size,
                             max_new_tokens=max_new_tokens)
    result["seconds"] = time.perf_counter() - t0
    return result
