"""Exact-match accuracy of a model on jaxalign's task rows (`jaxalign.synth.tasks`), greedy.

  python scripts/eval_tasks.py MODEL EVAL_JSONL [--limit N] [--batch-size 16] [--max-new-tokens 32]
                               [--dtype float32|bfloat16] [--dump OUT.jsonl]

MODEL is an HF directory or a jaxalign checkpoint. Prints a table of accuracy per kind and
overall, then, as stdout's last line, {"exact_match": ..., "per_kind": {...}, "n": ...}.
Progress goes to stderr. `--dump` writes every row with its completion and verdict.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF model directory or jaxalign checkpoint")
    ap.add_argument("eval_jsonl", help="task rows, e.g. eval.jsonl from python -m jaxalign.synth.tasks")
    ap.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--dump", default=None, help="write rows + completions + verdicts here (jsonl)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("--batch-size and --max-new-tokens must be >= 1")
    if not Path(args.eval_jsonl).is_file():
        ap.error(f"{args.eval_jsonl}: no such file")

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from jaxalign.synth import task_eval, tasks

    rows = tasks.read_jsonl(args.eval_jsonl)[:args.limit]
    result = task_eval.evaluate(args.model, rows, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, dtype=args.dtype)
    logging.getLogger("jaxalign.tasks").info("evaluated %d rows in %.1fs (load and compile included)",
                                             result["n"], result["seconds"])
    if args.dump:
        tasks.write_jsonl(args.dump, [{**r, "completion": c, "correct": ok} for r, c, ok in
                                      zip(rows, result["completions"], result["correct"])])
    print(tasks.format_table(result))
    print(json.dumps({"exact_match": result["exact_match"], "per_kind": result["per_kind"],
                      "n": result["n"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
