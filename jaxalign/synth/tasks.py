"""jaxalign's own instruction tasks with checkable answers, and an exact-match evaluator.

Each task has one unambiguous answer that the prompt asks for in an exact form. The default
kinds were calibrated on SmolLM2-135M-Instruct (greedy, zero-shot), which almost never replies
with a bare value ("Reply with only the number" gets "37 + 48 = 85" or "The answer is 85."),
so every default kind asks for a form that this model produces some of the time and gets
right only some of the time: headroom both ways for a short SFT.

  arithmetic  complete an equation            "Fill in the result: 37 + 48 =" -> "37 + 48 = 85"
  capitalize  capital first letters            "...: apple, pear, plum" -> "Apple, Pear, Plum"
  sort        three numbers, either direction  "Numbers: 42, 7, 19\\n..." -> "7, 19, 42"
  year        which of two years was asked    "...? Answer in the form: The year is YEAR." -> "The year is 1987"
  name        the writer ("my name is"), with a distractor name -> "The writer's name is Maria Lopez"

Extra kinds, bare answers, ~0% zero-shot for SmolLM2-135M (harder; pass them in `kinds`):

  uppercase   words in capitals, joined by ", "  -> "APPLE, PEAR, PLUM"
  reverse     a short list in reverse order      -> "owl, dog, cat"
  email       the email address in a sentence    -> "anna.berg@example.com"

A row is the chat form that `jaxalign.data` reads (format 'chat'), plus what checking needs:

  {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}],
   "kind": KIND, "answer": ANSWER, "args": [str, ...]}

`answer` is the exact string a correct completion equals after `normalise` (whitespace and one
trailing period stripped); `args` are the inputs the answer is computed from (operands, the word
or number list, the candidates), always strings so that every row has one Arrow schema.

Generation is pure Python (`random.Random` seeded with a string, which hashes the same in every
process and Python version), so `make_tasks(n, seed)` is the same list everywhere. Within a list
prompts are unique and kinds are balanced (rounds of one row per kind, in random order).

  python -m jaxalign.synth.tasks OUT_DIR --train 2000 --eval 200 --seed 0

writes OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl, whose prompts are disjoint. Running a model
on them (`evaluate`, `generate_completions`) is `jaxalign.synth.task_eval`.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger("jaxalign.tasks")

KINDS = ("arithmetic", "capitalize", "sort", "year", "name")
EXTRA_KINDS = ("uppercase", "reverse", "email")
ALL_KINDS = KINDS + EXTRA_KINDS

# ----------------------------------------------------------------------------- vocabularies

NOUNS = ("apple pear plum grape lemon mango peach cherry melon kiwi olive onion carrot potato "
         "tomato pepper garlic bread cheese butter honey sugar salt coffee tea milk water juice "
         "cat dog horse mouse rabbit tiger lion zebra eagle owl duck goose shark whale snake frog "
         "table chair lamp door window pencil paper book clock phone cup plate spoon fork knife "
         "river mountain forest desert island ocean cloud storm rain snow wind stone sand "
         "red green blue yellow purple orange silver golden").split()
FIRST = ("Anna Maria Lucas Noah Emma Olivia Liam Sofia Mateo Chloe Ethan Mia Hugo Clara Felix Nina "
         "Oscar Lena David Sara Tomas Elena Ivan Julia Marco Paula Omar Leila Pedro Hana Yuki Kofi "
         "Amara Ravi Priya Jonas Ingrid Pablo Rosa Samuel Alice Victor Irene Daniel Laura Simon "
         "Eva Adam Nora Leo").split()
LAST = ("Berg Lopez Novak Silva Moreau Kowalski Tanaka Okafor Rossi Jensen Fischer Garcia Haddad "
        "Ivanova Larsen Mendes Nakamura Osei Patel Quinn Rahman Santos Schmidt Torres Varga "
        "Walsh Young Zimmer Costa Dubois Eriksen Ferreira Gruber Hansen Keller Lindqvist "
        "Marino Nowak Petrov Reyes").split()
DOMAINS = ("example.com mail.org inbox.net post.io webmail.com company.org studio.net "
           "school.edu lab.org shop.com").split()
CITIES = ("Lisbon Oslo Lagos Lima Kyoto Berlin Nairobi Quito Dublin Hanoi Porto Krakow Tunis Accra "
          "Seville Bergen Madras Perth Denver Leeds").split()
THINGS = ("the old bridge", "the city library", "the first railway station", "the harbour wall",
          "the town hall", "the lighthouse", "the botanical garden", "the stone church",
          "the science museum", "the main theatre", "the river dam", "the village school")
JOBS = ("a teacher", "a nurse", "an engineer", "a baker", "a pilot", "a student", "a farmer",
        "a painter", "a doctor", "a chef", "a lawyer", "a musician")

# ----------------------------------------------------------------------------- task makers
# Each maker takes a random.Random and returns (prompt, answer, args). The wordings of the
# default kinds are ones SmolLM2-135M-Instruct answered in the asked form some of the time.
# Small changes move it a lot: "Reply with only the number / year / address" got 0% (it
# answers in a sentence), JSON answers mostly got code, "Answer in the form: A, B, C" got the
# placeholder copied, and "Capitalize the first letter of each word: ..." got a sentence about
# capitals. Change a template only with a zero-shot run (scripts/eval_tasks.py) beside it.

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
ARITH_TEMPLATES = (
    "Fill in the result: {a} {op} {b} =",
    "Complete the equation: {a} {op} {b} =",
    "What is {a} {op} {b}? Reply with the complete equation.",
)


def arithmetic(rng: random.Random) -> tuple[str, str, list[str]]:
    op = rng.choice("+-*")
    # Small operands: with two-digit ones SmolLM2-135M was right about one time in ten.
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
    else:
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        if op == "-" and b > a:
            a, b = b, a  # non-negative results: one unambiguous spelling of the answer
    prompt = rng.choice(ARITH_TEMPLATES).format(a=a, b=b, op=op)
    return prompt, f"{a} {op} {b} = {OPS[op](a, b)}", [str(a), op, str(b)]


def _word_task(rng: random.Random, lo: int, hi: int, templates: Sequence[str], sep: str,
               answer: Callable[[list[str]], Iterable[str]]) -> tuple[str, str, list[str]]:
    """The word-list tasks: lo..hi distinct nouns shown joined by `sep` in one of `templates`;
    the answer is `answer(words)`, comma-separated."""
    words = rng.sample(NOUNS, rng.randint(lo, hi))
    prompt = rng.choice(templates).format(items=sep.join(words))
    return prompt, ", ".join(answer(words)), words


CAPITALIZE_TEMPLATES = (
    "Write the words with capital first letters, separated by commas: {items}",
    "Write these words with capital first letters, separated by commas: {items}",
    "Write the following words with capital first letters, separated by commas: {items}",
)


def capitalize(rng: random.Random) -> tuple[str, str, list[str]]:
    return _word_task(rng, 3, 3, CAPITALIZE_TEMPLATES, ", ", lambda ws: [w.capitalize() for w in ws])


SORT_TEMPLATES = (
    "Numbers: {nums}\nList them from {order}, comma-separated, and nothing else.",
    "Numbers: {nums}\nWrite them from {order}, separated by commas, and nothing else.",
    "Numbers: {nums}\nList them in order from {order}, comma-separated.",
)


def sort(rng: random.Random) -> tuple[str, str, list[str]]:
    nums = rng.sample(range(1, 100), 3)
    descending = rng.random() < 0.5
    order = "largest to smallest" if descending else "smallest to largest"
    prompt = rng.choice(SORT_TEMPLATES).format(order=order, nums=", ".join(map(str, nums)))
    answer = ", ".join(map(str, sorted(nums, reverse=descending)))
    return prompt, answer, [str(n) for n in nums] + ["desc" if descending else "asc"]


# Two years per sentence, the question names one of the two events.
YEAR_EVENTS = (("planned", "opened"), ("started", "finished"), ("designed", "built"),
               ("founded", "rebuilt"), ("begun", "completed"))
YEAR_SENTENCES = (
    "{Thing} in {city} was {v1} in {y1} and {v2} in {y2}.",
    "In {city}, {thing} was {v1} in {y1}; it was {v2} in {y2}.",
    "Records say that {thing} in {city} was {v1} in {y1} and {v2} in {y2}.",
    "{Thing} in {city} was {v2} in {y2}, although it was {v1} as early as {y1}.",
)
YEAR_QUESTIONS = (
    "In which year was it {v}? Answer in the form: The year is YEAR.",
    "When was {thing} {v}? Answer in the form: The year is YEAR.",
    "What year was it {v} in? Answer in the form: The year is YEAR.",
)


def year(rng: random.Random) -> tuple[str, str, list[str]]:
    y1 = rng.randint(1600, 1980)
    y2 = y1 + rng.randint(2, 40)
    v1, v2 = rng.choice(YEAR_EVENTS)
    thing = rng.choice(THINGS)
    text = rng.choice(YEAR_SENTENCES).format(thing=thing, Thing=thing[0].upper() + thing[1:],
                                             city=rng.choice(CITIES), v1=v1, v2=v2, y1=y1, y2=y2)
    asked = rng.choice((v1, v2))
    question = rng.choice(YEAR_QUESTIONS).format(v=asked, thing=thing)
    answer_year = y1 if asked == v1 else y2
    return f"{text}\n{question}", f"The year is {answer_year}", [str(y1), v1, str(y2), v2, asked]


NAME_SENTENCES = (
    "Good morning! My name is {name} and I work with {other} as {job} in {city}.",
    "{other} told me to write to you. My name is {name}, and I am {job} in {city}.",
    "Hello everyone, my name is {name}. My colleague {other} could not come today.",
    "I am {job} in {city}. My name is {name}, and my manager is {other}.",
    "Dear {other}, thank you for the letter. My name is {name} and I would like to join.",
)
NAME_QUESTIONS = (
    "Who is writing? Answer in the form: The writer's name is NAME.",
    "Who wrote this message? Answer in the form: The writer's name is NAME.",
    "What is the writer's name? Answer in the form: The writer's name is NAME.",
)


def name(rng: random.Random) -> tuple[str, str, list[str]]:
    first, other_first = rng.sample(FIRST, 2)
    full, other = f"{first} {rng.choice(LAST)}", f"{other_first} {rng.choice(LAST)}"
    text = rng.choice(NAME_SENTENCES).format(name=full, other=other, job=rng.choice(JOBS),
                                             city=rng.choice(CITIES))
    return f"{text}\n{rng.choice(NAME_QUESTIONS)}", f"The writer's name is {full}", [full, other]


UPPER_TEMPLATES = (
    "Write the words in UPPERCASE, separated by commas: {items}",
    "Convert each word to capital letters and separate them with a comma and a space: {items}",
    "Rewrite these words in all caps as a comma-separated list: {items}",
    "Words: {items}\nReturn them in UPPERCASE, separated by commas, and nothing else.",
)


def uppercase(rng: random.Random) -> tuple[str, str, list[str]]:
    return _word_task(rng, 3, 4, UPPER_TEMPLATES, " ", lambda ws: [w.upper() for w in ws])


REVERSE_TEMPLATES = (
    "Reverse the order of this list: {items}. Reply with only the reversed list, separated by commas.",
    "Write these items in reverse order, separated by commas: {items}",
    "List: {items}\nGive the same items from last to first, comma-separated, and nothing else.",
    "Put the following words in the opposite order and separate them with commas: {items}",
)


def reverse(rng: random.Random) -> tuple[str, str, list[str]]:
    return _word_task(rng, 3, 5, REVERSE_TEMPLATES, ", ", reversed)


EMAIL_SENTENCES = (
    "Hi, this is {name}. You can reach me at {email} any time this week.",
    "For questions about the order, write to {email} and mention your invoice number.",
    "{name} from {city} asked us to send the report to {email} before Friday.",
    "Please update my contact details: my new address is {email}, not the old one.",
    "The workshop is organised by {name}; registration goes through {email}.",
)
EMAIL_TEMPLATES = (
    "Extract the email address from: {text} Reply with only the address.",
    "Text: {text}\nWhat is the email address in this text? Answer with only the email address.",
    "Find the email address in the following message and reply with nothing else.\n{text}",
)


def email(rng: random.Random) -> tuple[str, str, list[str]]:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    user = rng.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}{rng.randint(1, 99)}",
                       f"{last}.{first[0]}"]).lower()
    addr = f"{user}@{rng.choice(DOMAINS)}"
    text = rng.choice(EMAIL_SENTENCES).format(name=f"{first} {last}", email=addr,
                                              city=rng.choice(CITIES))
    return rng.choice(EMAIL_TEMPLATES).format(text=text), addr, [addr]


MAKERS: dict[str, Callable[[random.Random], tuple[str, str, list[str]]]] = {
    "arithmetic": arithmetic, "capitalize": capitalize, "sort": sort, "year": year, "name": name,
    "uppercase": uppercase, "reverse": reverse, "email": email,
}
assert tuple(MAKERS) == ALL_KINDS

# ----------------------------------------------------------------------------- datasets

def _row(kind: str, prompt: str, answer: str, args: list[str]) -> dict:
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}],
            "kind": kind, "answer": answer, "args": args}


def prompt_of(row: dict) -> str:
    """The user message of a task row (what a model is asked)."""
    return row["messages"][0]["content"]


def balanced_draws(n: int, kinds: Sequence[str], known: Sequence[str], rng: random.Random,
                   draw: Callable[[str, random.Random], tuple[str, Any]], *,
                   exclude: Iterable[str] = (), what: str = "task") -> list[tuple[str, Any]]:
    """n (key, item) = draw(kind, rng), kinds balanced: rounds of one draw per kind, each round
    in its own random order, so every prefix is balanced too. Keys are unique within the list
    and never in `exclude`; a collision is redrawn (each draw may pick new inputs)."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in known]
    if unknown or not kinds:
        raise ValueError(f"unknown {what} kind(s) {unknown}; expected some of {list(known)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seen = set(exclude)
    out: list[tuple[str, Any]] = []
    order: list[str] = []
    for _ in range(n):
        if not order:
            order = rng.sample(kinds, len(kinds))
        kind = order.pop()
        for _ in range(1000):  # a collision is rare; a kind this exhausted is a bug in its space
            key, item = draw(kind, rng)
            if key not in seen:
                break
        else:
            raise ValueError(f"{what} kind {kind!r}: could not draw a new one after 1000 tries")
        seen.add(key)
        out.append((key, item))
    return out


def make_tasks(n: int, seed: int = 0, kinds: Sequence[str] = KINDS, *, split: str = "train",
               exclude: Iterable[str] = ()) -> list[dict]:
    """n rows with unique prompts, kinds balanced: rounds of one row per kind, each round in
    its own random order, so every prefix (`--limit`) is balanced too.

    `split` salts the random stream (the same seed gives unrelated train and eval draws);
    prompts in `exclude` are never produced (how `write_splits` keeps eval out of train).
    """
    def draw(kind, rng):
        prompt, answer, args = MAKERS[kind](rng)
        return prompt, _row(kind, prompt, answer, args)

    rng = random.Random(f"jaxalign-tasks/{seed}/{split}")
    return [row for _, row in balanced_draws(n, kinds, ALL_KINDS, rng, draw, exclude=exclude)]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_splits(out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0,
                 kinds: Sequence[str] = KINDS) -> tuple[Path, Path]:
    """Writes out_dir/train.jsonl and out_dir/eval.jsonl. Eval is drawn first, so it does not
    depend on n_train; train never repeats an eval prompt (nor its own)."""
    eval_rows = make_tasks(n_eval, seed, kinds, split="eval")
    train_rows = make_tasks(n_train, seed, kinds, split="train",
                            exclude={prompt_of(r) for r in eval_rows})
    out = Path(out_dir)
    return write_jsonl(out / "train.jsonl", train_rows), write_jsonl(out / "eval.jsonl", eval_rows)


# ----------------------------------------------------------------------------- scoring

def normalise(text: str) -> str:
    """What exact match compares: surrounding whitespace and one trailing period removed."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(completions: Sequence[str], answers: Sequence[str],
                kinds: Sequence[str] | None = None) -> dict:
    """{"exact_match": fraction correct, "per_kind": {kind: fraction}, "n": count, "correct":
    [bool per row]}. Without `kinds` every row counts as kind 'all'."""
    if len(completions) != len(answers) or (kinds is not None and len(kinds) != len(answers)):
        raise ValueError(f"got {len(completions)} completions for {len(answers)} answers"
                         + (f" and {len(kinds)} kinds" if kinds is not None else ""))
    kinds = list(kinds) if kinds is not None else ["all"] * len(answers)
    correct = [normalise(c) == normalise(a) for c, a in zip(completions, answers)]
    total, hits = Counter(kinds), Counter(k for k, ok in zip(kinds, correct) if ok)
    return {"exact_match": sum(correct) / len(correct) if correct else 0.0,
            "per_kind": {k: hits[k] / total[k] for k in sorted(total)},
            "n": len(correct), "correct": correct}


def format_table(result: dict) -> str:
    """Accuracy per kind and overall, as an aligned plain-text table."""
    counts = result.get("counts", {})
    lines = [f"{'kind':<12} {'n':>5} {'exact':>7}"]
    for k, acc in result["per_kind"].items():
        lines.append(f"{k:<12} {counts.get(k, ''):>5} {acc:>7.1%}")
    lines.append(f"{'overall':<12} {result['n']:>5} {result['exact_match']:>7.1%}")
    return "\n".join(lines)


def score_rows(rows: Sequence[dict], completions: Sequence[str]) -> dict:
    """exact_match of completions against task rows, with per-kind counts added."""
    result = exact_match(completions, [r["answer"] for r in rows], [r["kind"] for r in rows])
    result["counts"] = dict(sorted(Counter(r["kind"] for r in rows).items()))
    return result


# ----------------------------------------------------------------------------- command line

def splits_parser(prog: str, what: str, unit: str, kinds: Sequence[str],
                  extra_kinds: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The command line shared by the synthetic set writers (this module and `prefs`)."""
    ap = argparse.ArgumentParser(prog=prog, description=f"Write train.jsonl and eval.jsonl of {what}.")
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=2000, help=f"training {unit} (default 2000)")
    ap.add_argument("--eval", type=int, default=200, help=f"evaluation {unit} (default 200)")
    ap.add_argument("--seed", type=int, default=0)
    extra = f"; extra: {','.join(extra_kinds)}" if extra_kinds else ""
    ap.add_argument("--kinds", default=",".join(kinds),
                    help=f"comma-separated, default {','.join(kinds)}{extra}")
    return ap


def parse_splits(ap: argparse.ArgumentParser, argv: Sequence[str] | None,
                 known: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(args, the --kinds list), with usage errors for unknown kinds or negative sizes."""
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in known]
    if bad or not kinds:
        ap.error(f"--kinds: unknown kind(s) {bad}; expected some of {','.join(known)}")
    if args.train < 0 or args.eval < 0:
        ap.error("--train and --eval must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    return args, kinds


def main(argv: Sequence[str] | None = None) -> int:
    ap = splits_parser("python -m jaxalign.synth.tasks", "jaxalign's tasks", "rows", KINDS,
                       EXTRA_KINDS)
    args, kinds = parse_splits(ap, argv, ALL_KINDS)
    paths = write_splits(args.out_dir, args.train, args.eval, args.seed, kinds)
    log.info("wrote %d train and %d eval rows of %s", args.train, args.eval, ", ".join(kinds))
    print("\n".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
