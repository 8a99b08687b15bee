"""Synthetic preference pairs whose preferred side is known: a checkable set for RM / DPO runs.

Three kinds, built on the questions of `jaxalign.synth.tasks` (so answers are computed, not
guessed):

  correct   a task prompt as is; chosen = the right answer, rejected = a plausible wrong one:
            arithmetic off by a little, numbers in the opposite order, the other year in the
            text, the distractor name, words not capitalised / not reversed, a wrong domain.
  format    a short question plus a format instruction ("Answer in uppercase letters.",
            'Reply in JSON with the key "answer".', "Answer with one word.", ...); chosen
            follows it, rejected gives the same answer ignoring it.
  concise   a short question; chosen = the direct answer, rejected = the same answer wrapped
            in filler sentences.

Rows are the `preference` format that `jaxalign.data.preference` reads, plus what checking needs:

  {"prompt": str, "chosen": str, "rejected": str, "kind": KIND,
   "task": TASK KIND, "answer": the task's answer (== chosen for 'correct'), "args": [str, ...]}

Deterministic by seed (`random.Random` seeded with a string, like tasks.py). Splits are
disjoint by question, not only by prompt text: every row has a key (task kind + the inputs its
answer is computed from), and no key of eval appears in train, whatever the kind or wording.

With --unpaired, each pair becomes two rows of TRL's unpaired format (for KTO), the chosen
side desirable and the rejected side undesirable, shuffled so that a prompt's two rows are
rarely neighbours:

  {"prompt": str, "completion": str, "label": bool, "kind", "task", "answer", "args"}

  python -m jaxalign.synth.prefs OUT_DIR --train 2000 --eval 200 --seed 0 [--unpaired]
"""

from __future__ import annotations

import json
import logging
import random
import sys
from pathlib import Path
from typing import Iterable, Sequence

from jaxalign.synth import tasks

log = logging.getLogger("jaxalign.prefs")

KINDS = ("correct", "format", "concise")
CORRECT_TASKS = tasks.ALL_KINDS
QUESTION_TASKS = ("arithmetic", "year", "name", "sort")


def _wrong(task: str, answer: str, args: list[str], rng: random.Random) -> str:
    """A plausible wrong answer in the same form as the right one."""
    if task == "arithmetic":
        a, op, b = int(args[0]), args[1], int(args[2])
        right = tasks.OPS[op](a, b)
        delta = rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if right + d >= 0])
        return f"{a} {op} {b} = {right + delta}"
    if task == "capitalize":
        return rng.choice([", ".join(args), ", ".join(w.upper() for w in args),
                           ", ".join([args[0].capitalize()] + args[1:])])
    if task == "sort":
        nums, descending = [int(n) for n in args[:3]], args[3] == "desc"
        return ", ".join(map(str, sorted(nums, reverse=not descending)))
    if task == "year":
        y1, v1, y2, _, asked = args
        return f"The year is {y2 if asked == v1 else y1}"
    if task == "name":
        return f"The writer's name is {args[1]}"
    if task == "uppercase":
        return rng.choice([", ".join(args), ", ".join(w.upper() for w in reversed(args))])
    if task == "reverse":
        return ", ".join(args)
    if task == "email":
        user, domain = args[0].split("@")
        return f"{user}@{rng.choice([d for d in tasks.DOMAINS if d != domain])}"
    raise ValueError(f"no wrong answer for task kind {task!r}")


def _question(task: str, rng: random.Random) -> tuple[str, str, list[str], str]:
    """(short question, its answer, args, answer type) for the format / concise kinds."""
    if task == "arithmetic":
        _, _, args = tasks.arithmetic(rng)
        a, op, b = int(args[0]), args[1], int(args[2])
        return f"What is {a} {op} {b}?", str(tasks.OPS[op](a, b)), args, "number"
    if task == "year":
        prompt, answer, args = tasks.year(rng)
        return (f"{prompt.splitlines()[0]}\nIn which year was it {args[4]}?",
                answer.split()[-1], args, "number")
    if task == "name":  # the full name, or the first name (a one-word answer)
        prompt, _, args = tasks.name(rng)
        text = prompt.splitlines()[0]
        if rng.random() < 0.5:
            return f"{text}\nWhat is the writer's first name?", args[0].split()[0], args, "word"
        return f"{text}\nWho is writing?", args[0], args, "text"
    if task == "sort":
        _, answer, args = tasks.sort(rng)
        order = "largest to smallest" if args[3] == "desc" else "smallest to largest"
        return f"Sort these numbers from {order}: {', '.join(args[:3])}.", answer, args, "list"
    raise ValueError(f"no short question for task kind {task!r}")


# (instruction, answer types it applies to, following, ignoring)
FORMATS = (
    ("Answer in uppercase letters.", ("text", "word"), str.upper, str),
    ("Answer in lowercase letters.", ("text", "word"), str.lower, str),
    ('Reply in JSON with the key "answer".', ("number", "text", "word", "list"),
     lambda a: json.dumps({"answer": a}), str),
    ("Answer with one word.", ("word",), str, lambda a: f"The writer's first name is {a}."),
    ("Answer with only the number.", ("number",), str, lambda a: f"The answer is {a}."),
    ("Put your answer in double quotes.", ("number", "text", "word", "list"),
     lambda a: f'"{a}"', str),
    ("Write each number on its own line.", ("list",), lambda a: a.replace(", ", "\n"), str),
)
OPENERS = ("Great question! Let me think about this carefully before I answer.",
           "Sure, I would be happy to help you with that. This is an interesting one.",
           "Thanks for asking! There are a few things worth considering here.",
           "That is a good question, and it deserves a careful and complete answer.")
MIDDLES = ("After thinking it through, the answer is {a}.",
           "Having considered everything, I can say that the answer is {a}.",
           "So, putting it all together, the answer is {a}.",
           "The answer to your question is {a}.")
CLOSERS = ("I hope this helps! Let me know if you have any other questions.",
           "Feel free to ask if anything is unclear.",
           "Please double-check it yourself if it matters to you.",
           "Let me know if you would like a more detailed explanation.")


def _make(kind: str, rng: random.Random) -> tuple[str, dict]:
    """(key, row) of one pair of `kind`; the key names the underlying question."""
    if kind == "correct":
        task = rng.choice(CORRECT_TASKS)
        prompt, answer, args = tasks.MAKERS[task](rng)
        chosen, rejected = answer, _wrong(task, answer, args, rng)
        if tasks.normalise(chosen) == tasks.normalise(rejected):
            raise AssertionError(f"{task}: the wrong answer {rejected!r} is right")
    else:
        task = rng.choice(QUESTION_TASKS)
        question, answer, args, atype = _question(task, rng)
        if kind == "format":
            instruction, _, follow, ignore = rng.choice([f for f in FORMATS if atype in f[1]])
            prompt, chosen, rejected = f"{question}\n{instruction}", follow(answer), ignore(answer)
        else:
            prompt, chosen = question, answer
            rejected = " ".join([rng.choice(OPENERS), rng.choice(MIDDLES).format(a=answer),
                                 rng.choice(CLOSERS)])
    key = json.dumps([task, args])
    return key, {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind,
                 "task": task, "answer": answer, "args": list(args)}


def make_prefs(n: int, seed: int = 0, kinds: Sequence[str] = KINDS, *, split: str = "train",
               exclude: Iterable[str] = ()) -> tuple[list[dict], set[str]]:
    """n rows, kinds balanced (rounds of one row per kind, each in random order), questions
    unique within the list and never in `exclude` (keys). Returns (rows, their keys)."""
    rng = random.Random(f"jaxalign-prefs/{seed}/{split}")
    drawn = tasks.balanced_draws(n, kinds, KINDS, rng, _make, exclude=exclude, what="preference")
    return [row for _, row in drawn], {key for key, _ in drawn}


def to_unpaired(rows: Sequence[dict], seed: int = 0, split: str = "train") -> list[dict]:
    """Pairs -> twice as many unpaired rows (chosen: label true, rejected: label false), in a
    seeded random order."""
    out = []
    for row in rows:
        rest = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        for side, label in (("chosen", True), ("rejected", False)):
            out.append({"prompt": row["prompt"], "completion": row[side], "label": label, **rest})
    random.Random(f"jaxalign-prefs/{seed}/{split}/unpaired").shuffle(out)
    return out


def write_splits(out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0,
                 kinds: Sequence[str] = KINDS, unpaired: bool = False) -> tuple[Path, Path]:
    """Writes out_dir/train.jsonl and out_dir/eval.jsonl. Eval is drawn first, so it does not
    depend on n_train; train never repeats an eval question (nor its own). unpaired: the
    same pairs as `to_unpaired` rows (2 n_train and 2 n_eval rows)."""
    eval_rows, eval_keys = make_prefs(n_eval, seed, kinds, split="eval")
    train_rows, _ = make_prefs(n_train, seed, kinds, split="train", exclude=eval_keys)
    if unpaired:
        eval_rows = to_unpaired(eval_rows, seed, "eval")
        train_rows = to_unpaired(train_rows, seed, "train")
    out = Path(out_dir)
    return (tasks.write_jsonl(out / "train.jsonl", train_rows),
            tasks.write_jsonl(out / "eval.jsonl", eval_rows))


def main(argv: Sequence[str] | None = None) -> int:
    ap = tasks.splits_parser("python -m jaxalign.synth.prefs", "synthetic preference pairs "
                             "(prompt, chosen, rejected)", "pairs", KINDS)
    ap.add_argument("--unpaired", action="store_true",
                    help="write each pair as two labelled rows {prompt, completion, label} (KTO)")
    args, kinds = tasks.parse_splits(ap, argv, KINDS)
    paths = write_splits(args.out_dir, args.train, args.eval, args.seed, kinds, args.unpaired)
    log.info("wrote %d train and %d eval pairs of %s%s", args.train, args.eval, ", ".join(kinds),
             " as labelled unpaired rows" if args.unpaired else "")
    print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
