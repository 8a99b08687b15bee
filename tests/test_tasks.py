"""jaxalign's own task set (`jaxalign.synth.tasks`): determinism, disjoint splits, correct
answers, loss masks through the SFT pipeline, and exact-match scoring. No jax is compiled:
the model side is exercised with a stand-in for `generate_text`.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from jaxalign.data import DataConfig, build_sft_data
from jaxalign.synth import tasks
from jaxalign.synth.tasks import ALL_KINDS, KINDS, exact_match, make_tasks, prompt_of, write_splits



@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from make_tiny_model import make_tiny_tokenizer  # scripts/ is on sys.path (conftest)
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


def expected_answer(row: dict) -> str:
    """The answer recomputed from the row's inputs, independently of the generator."""
    kind, args = row["kind"], row["args"]
    if kind == "arithmetic":
        a, op, b = int(args[0]), args[1], int(args[2])
        return f"{a} {op} {b} = " + str({"+": a + b, "-": a - b, "*": a * b}[op])
    if kind == "capitalize":
        return ", ".join(w[0].upper() + w[1:] for w in args)
    if kind == "uppercase":
        return ", ".join(w.upper() for w in args)
    if kind == "reverse":
        return ", ".join(args[::-1])
    if kind == "sort":
        *nums, order = args
        return ", ".join(str(n) for n in sorted(map(int, nums), reverse=order == "desc"))
    if kind == "year":
        y1, v1, y2, v2, asked = args
        return f"The year is {y1 if asked == v1 else y2}"
    if kind == "name":
        return f"The writer's name is {args[0]}"
    return args[0]  # email: the extracted address itself


# ---- generation --------------------------------------------------------------------------------

def test_make_tasks_is_deterministic_by_seed():
    a, b = make_tasks(50, seed=3), make_tasks(50, seed=3)
    assert a == b
    assert [prompt_of(r) for r in make_tasks(50, seed=4)] != [prompt_of(r) for r in a]
    assert make_tasks(20, seed=3) == a[:20]  # a longer list extends a shorter one
    assert make_tasks(20, seed=3, split="eval") != make_tasks(20, seed=3)


def test_generation_is_the_same_in_a_fresh_process():
    # String seeds hash with sha512, not Python's per-process salted hash.
    code = ("import json; from jaxalign.synth.tasks import make_tasks; "
            "print(json.dumps(make_tasks(30, seed=7)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == make_tasks(30, seed=7)


def test_kinds_balanced_prompts_unique_rows_in_chat_form():
    rows = make_tasks(len(KINDS) * 30 + 3, seed=0)
    assert len({prompt_of(r) for r in rows}) == len(rows)
    for k in range(1, len(rows) // len(KINDS) + 1):  # every whole round holds each kind once
        assert Counter(r["kind"] for r in rows[:k * len(KINDS)]) == {kind: k for kind in KINDS}
    for r in rows:
        assert set(r) == {"messages", "kind", "answer", "args"}
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant == {"role": "assistant", "content": r["answer"]}
        assert r["answer"] == r["answer"].strip() and not r["answer"].endswith(".")
        assert all(isinstance(a, str) for a in r["args"])  # one Arrow schema for every row
    sub = make_tasks(12, seed=0, kinds=["sort", "year"])
    assert Counter(r["kind"] for r in sub) == {"sort": 6, "year": 6}
    with pytest.raises(ValueError, match="unknown task kind"):
        make_tasks(3, kinds=["poetry"])


def test_every_answer_is_correct():
    rows = make_tasks(len(ALL_KINDS) * 60, seed=1, kinds=ALL_KINDS)
    templates = Counter()
    for r in rows:
        prompt, answer, args = prompt_of(r), r["answer"], r["args"]
        assert answer == expected_answer(r), r
        templates[(r["kind"], re.sub(r"\d+", "#", prompt)[:30])] += 1
        if r["kind"] in ("capitalize", "uppercase", "reverse", "sort"):
            items = args[:-1] if r["kind"] == "sort" else args
            assert len(set(items)) == len(items) >= 3  # distinct items: one correct order
            # The items appear in the prompt in the order the args list them.
            assert re.search(r"\W+".join(map(re.escape, items)), prompt), (items, prompt)
        elif r["kind"] == "arithmetic":
            a, op, b = args
            assert f"{a} {op} {b}" in prompt and int(answer.split(" = ")[1]) >= 0
        elif r["kind"] == "email":
            assert re.findall(r"[\w.]+@[\w.]+\w", prompt) == [answer]
        elif r["kind"] == "year":
            y1, v1, y2, v2, asked = args
            # Both years are there and the question names exactly one of the two events.
            assert re.findall(r"\b\d{4}\b", prompt) in ([y1, y2], [y2, y1]) and y1 < y2
            question = prompt.splitlines()[-1]
            assert (f" {v1}" in question) != (f" {v2}" in question) and f" {asked}" in question
        elif r["kind"] == "name":
            said = re.search(r"my name is ([A-Z]\w+ [A-Z]\w+)", prompt, re.IGNORECASE)
            assert said and said.group(1) == args[0]
            assert args[1] in prompt and args[1].split()[0] != args[0].split()[0]  # the distractor
    # Wording varies within a kind.
    per_kind = Counter(kind for kind, _ in templates)
    assert all(per_kind[k] >= 3 for k in ALL_KINDS), per_kind


def test_splits_are_disjoint_and_eval_does_not_depend_on_train_size(tmp_path):
    train, evl = write_splits(tmp_path / "a", n_train=700, n_eval=140, seed=0)
    train_rows, eval_rows = tasks.read_jsonl(train), tasks.read_jsonl(evl)
    assert (len(train_rows), len(eval_rows)) == (700, 140)
    train_prompts = {prompt_of(r) for r in train_rows}
    assert len(train_prompts) == 700
    assert not train_prompts & {prompt_of(r) for r in eval_rows}
    _, evl_small = write_splits(tmp_path / "b", n_train=10, n_eval=140, seed=0)
    assert tasks.read_jsonl(evl_small) == eval_rows


def test_exclude_is_honoured_even_when_it_collides():
    rows = make_tasks(40, seed=5)
    again = make_tasks(40, seed=5, exclude={prompt_of(r) for r in rows[:10]})
    assert not {prompt_of(r) for r in rows[:10]} & {prompt_of(r) for r in again}


def test_cli_writes_splits(tmp_path, capsys):
    assert tasks.main([str(tmp_path), "--train", "30", "--eval", "14", "--seed", "2",
                       "--kinds", "sort,email"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")]
    train = tasks.read_jsonl(out[0])
    assert len(train) == 30 and len(tasks.read_jsonl(out[1])) == 14
    assert Counter(r["kind"] for r in train) == {"sort": 15, "email": 15}
    with pytest.raises(SystemExit) as e:
        tasks.main([str(tmp_path), "--kinds", "poetry"])
    assert e.value.code == 2 and "unknown kind" in capsys.readouterr().err


def test_importing_tasks_imports_neither_jax_nor_torch():
    code = ("import sys; from jaxalign.synth import tasks; tasks.make_tasks(7); "
            "print('jax' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- through the SFT pipeline ------------------------------------------------------------------

def test_rows_train_only_the_answer_and_end_of_turn(tiny_tok, tmp_path):
    rows = make_tasks(3 * len(ALL_KINDS), seed=0, kinds=ALL_KINDS)
    path = tasks.write_jsonl(tmp_path / "t.jsonl", rows)
    # The tiny tokenizer is nearly byte-level (384 tokens), so prompts need more than the 128
    # positions that SmolLM2's tokenizer needs (test below).
    cfg = DataConfig(train=[{"path": str(path)}], seq_len=384, shuffle=False,
                     cache_dir=str(tmp_path / "hf_cache"))
    data = build_sft_data(cfg, tiny_tok, batch_size=len(rows))
    total = data.stats.total()
    assert (total.kept, total.truncated, total.dropped_no_loss) == (len(rows), 0, 0)
    batch = next(data.train)
    eos = "<|im_end|>"
    for r, row in enumerate(rows):
        trained = batch["targets"][r][batch["loss_mask"][r] == 1]
        assert tiny_tok.decode(trained.tolist()) == row["answer"] + eos
        assert trained[-1] == tiny_tok.convert_tokens_to_ids(eos)
        seen = tiny_tok.decode(batch["tokens"][r][batch["segment_ids"][r] > 0].tolist())
        assert prompt_of(row) in seen and seen.count(row["answer"]) >= 1


def test_rows_fit_128_tokens_with_smollm2_tokenizer(tmp_path, smollm2_dir):
    from jaxalign.tokenizer import load_tokenizer
    tok = load_tokenizer(smollm2_dir)
    rows = make_tasks(40 * len(ALL_KINDS), seed=0, kinds=ALL_KINDS)
    path = tasks.write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train=[{"path": str(path)}], seq_len=128, truncation="drop",
                     cache_dir=str(tmp_path / "hf_cache"))
    data = build_sft_data(cfg, tok, batch_size=8)
    total = data.stats.total()
    assert (total.kept, total.dropped_too_long) == (len(rows), 0)
    assert data.train.datasets[0].lengths.max() <= 128


# ---- scoring -----------------------------------------------------------------------------------

def test_exact_match_hand_cases():
    res = exact_match(["85", " 85.\n", "The answer is 85.", "apple, pear", "APPLE, PEAR."],
                      ["85", "85", "85", "APPLE, PEAR", "APPLE, PEAR"],
                      ["arithmetic", "arithmetic", "arithmetic", "uppercase", "uppercase"])
    assert res["correct"] == [True, True, False, False, True]
    assert res["exact_match"] == pytest.approx(3 / 5) and res["n"] == 5
    assert res["per_kind"] == {"arithmetic": pytest.approx(2 / 3), "uppercase": 0.5}
    assert tasks.normalise("  x..") == "x." and tasks.normalise("3.5") == "3.5"
    assert exact_match(["a"], ["a"])["per_kind"] == {"all": 1.0}
    assert exact_match([], [])["exact_match"] == 0.0
    with pytest.raises(ValueError, match="2 completions for 1 answers"):
        exact_match(["a", "b"], ["a"])


def test_task_match_reward_is_the_tasks_exact_match():
    """The RL stage's verifiable reward (`jaxalign.rewards:task_match`, reading the training
    rows' `answer` column) scores exactly what the held-out eval's exact match counts, where
    the laxer `exact_answer` would pay for a wrong case or a bare number."""
    from jaxalign.rewards import exact_answer, task_match
    rows = make_tasks(10, seed=3)
    answers = [r["answer"] for r in rows]
    completions = [answers[0], answers[1] + ".", " " + answers[2] + "\n", answers[3].lower(),
                   "Sure! " + answers[4], answers[5].upper(), "", answers[7] + " and more",
                   answers[8], answers[0]]
    got = task_match([prompt_of(r) for r in rows], completions, answers)
    want = exact_match(completions, answers)["correct"]
    assert got == [float(ok) for ok in want]
    assert got[:3] == [1.0, 1.0, 1.0] and got[-1] == float(answers[0] == answers[9])
    assert task_match(["p"], ["apple, pear"], ["Apple, Pear"]) == [0.0]
    assert exact_answer(["p"], ["apple, pear"], ["Apple, Pear"]) == [1.0]


def test_evaluate_params_batches_pads_and_keeps_order(monkeypatch):
    import jaxalign.generate as generate
    rows = make_tasks(37, seed=0)
    answers = {prompt_of(r): r["answer"] for r in rows}
    shapes = []

    def fake_generate_text(cfg, params, tokenizer, prompts, *, chat, max_new_tokens, temperature,
                           top_p, top_k, seed):
        assert chat and temperature == 0.0 and max_new_tokens == 9
        shapes.append(len(prompts))
        # Right on even rows, chatty on odd ones.
        return [answers[p] + "." if i % 2 == 0 else "Sure! " + answers[p] for i, p in enumerate(prompts)]

    monkeypatch.setattr(generate, "generate_text", fake_generate_text)
    from jaxalign.synth import task_eval
    res = task_eval.evaluate_params(None, None, None, rows, batch_size=16, max_new_tokens=9)
    assert shapes == [16, 16, 16]  # the last 5 prompts padded to one batch shape
    assert res["n"] == 37 and len(res["completions"]) == 37
    assert res["correct"] == [i % 16 % 2 == 0 for i in range(37)]
    assert res["counts"] == dict(sorted(Counter(r["kind"] for r in rows).items()))
    table = tasks.format_table(res)
    assert table.splitlines()[-1].split() == ["overall", "37", f"{sum(res['correct']) / 37:.1%}"]
