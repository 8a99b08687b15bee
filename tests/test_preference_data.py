"""Preference data: formats, response masks, the pair batch layout, loaders, policies, prompts,
and the synthetic preference generator.

Masks are checked by decoding exactly the trained targets. Most tests use the tiny ChatML BPE
tokenizer of scripts/make_tiny_model.py (pad == eos == <|im_end|>, bos <|im_start|>); length
policies use a one-token-per-character tokenizer with a BOS and pad != eos, so lengths are
plain arithmetic; one test uses SmolLM2's real tokenizer. No jax is used here.
"""

import json
from collections import Counter

import numpy as np
import pytest

from jaxalign.config import ConfigError
from jaxalign.data import (BATCH_KEYS, PREF_BATCH_KEYS, DataConfig, DataError, Encoder, PairSet,
                           PrefEvalLoader, Source, build_preference_data, load_prompts,
                           normalise_pairs)
from jaxalign.data.pairs import Identical, NoPrompt, split_turn
from jaxalign.data.preference import tokenize_pairs
from jaxalign.synth import prefs, tasks

EOS = "<|im_end|>"
PROMPT_MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
HH_PROMPT = "\n\nHuman: what is 2 plus 3?\n\nAssistant: 5\n\nHuman: and 3 plus 4?\n\nAssistant:"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from make_tiny_model import make_tiny_tokenizer  # scripts/ is on sys.path (conftest)
    out = tmp_path_factory.mktemp("tiny_tok")
    make_tiny_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def tok_plain(tok_dir):
    """The same tokenizer without a chat template."""
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(tok_dir)
    t.chat_template = None
    return t


class CharTok:
    """One token per character (id = code point); BOS 1 added with special tokens; eos 2 != pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __call__(self, texts, add_special_tokens=True, **kw):
        return {"input_ids": [[1] * add_special_tokens + [ord(c) for c in t] for t in texts]}

    def decode(self, ids):
        return "".join({1: "<s>", 2: "</s>", 0: "_"}.get(i, chr(i)) for i in ids)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def encode(tokenizer, rows, fmt="auto", **kw):
    """rows -> (PairSet, PairStats) through normalise_pairs and tokenize_pairs, as if read from
    a file d.jsonl with one row per line."""
    cfg = DataConfig(train=["d.jsonl"], **{"seq_len": 256, **kw})
    src = Source("d.jsonl", list(rows), list(range(1, len(rows) + 1)))
    pairs, stats = normalise_pairs(src, fmt, on_empty=cfg.on_empty, on_identical=cfg.on_identical)
    encoder = Encoder(tokenizer, chat_template=cfg.chat_template)
    return tokenize_pairs(pairs, encoder, cfg, stats, src.where), stats


def one_batch(data: PairSet, pad_id: int, seq_len: int = 256) -> dict:
    return next(iter(PrefEvalLoader(data, seq_len=seq_len, batch_size=len(data), pad_id=pad_id)))


def trained(tokenizer, batch, b, side):
    """The trained targets of pair b, side s (0 chosen, 1 rejected), decoded."""
    return tokenizer.decode(batch["targets"][b, side][batch["loss_mask"][b, side] == 1].tolist())


def check_pair_rows(batch, pad_id):
    """The SFT row contract on every side of every pair, plus response-only loss."""
    for b in range(batch["tokens"].shape[0]):
        p = int(batch["prompt_len"][b])
        for s in range(2):
            tokens, targets, loss, seg, pos = (batch[k][b, s] for k in BATCH_KEYS)
            n = int((seg == 1).sum())
            assert (seg[:n] == 1).all() and (seg[n:] == 0).all()          # right-padded
            assert pos[:n].tolist() == list(range(n)) and (pos[n:] == 0).all()
            assert (tokens[n:] == pad_id).all() and (targets[n - 1:] == pad_id).all()
            np.testing.assert_array_equal(targets[:n - 1], tokens[1:n])   # next token
            assert (loss[n - 1:] == 0).all()                              # no target past the end
            assert (loss[:p - 1] == 0).all() and loss[p - 1] == 1         # first target: response
        np.testing.assert_array_equal(batch["tokens"][b, 0, :p], batch["tokens"][b, 1, :p])


# ---- response masks, per format -----------------------------------------------------------

def test_string_pair_trains_only_the_response_and_its_eos(tok):
    data, stats = encode(tok, [{"prompt": "What is 2 plus 3?", "chosen": "5", "rejected": "6"}])
    batch = one_batch(data, tok.pad_token_id)
    check_pair_rows(batch, tok.pad_token_id)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}],
                                     tokenize=False, add_generation_prompt=True)
    p = int(batch["prompt_len"][0])
    assert tok.decode(batch["tokens"][0, 0, :p].tolist()) == prompt
    for side, answer in [(0, "5"), (1, "6")]:
        n = int(batch["segment_ids"][0, side].sum())
        assert tok.decode(batch["tokens"][0, side, :n].tolist()) == prompt + answer + EOS + "\n"
        assert trained(tok, batch, 0, side) == answer + EOS
        # Exactly the targets from the first response token through the end of turn.
        assert np.flatnonzero(batch["loss_mask"][0, side]).tolist() == list(range(p - 1, n - 2))
    assert (stats.kept, stats.loss_tokens) == (1, int(batch["loss_mask"].sum()))


def test_pad_equal_to_eos_still_trains_the_eos(tok):
    assert tok.pad_token_id == tok.eos_token_id
    data, _ = encode(tok, [{"prompt": "q", "chosen": "yes", "rejected": "no no no"}])
    batch = one_batch(data, tok.pad_token_id)
    for s in range(2):
        eos_targets = (batch["targets"][0, s] == tok.eos_token_id)
        assert eos_targets.sum() > 1                                   # padding targets are eos too
        assert (eos_targets & (batch["loss_mask"][0, s] == 1)).sum() == 1  # only the end of turn trained
        assert (batch["tokens"][0, s][batch["segment_ids"][0, s] == 0] == tok.eos_token_id).all()


def test_message_list_pairs_and_conversations_that_repeat_the_prompt(tok):
    rows = [{"prompt": PROMPT_MSGS, "chosen": [{"role": "assistant", "content": "Hello"}],
             "rejected": "Go away"},
            # UltraFeedback style: each response is the whole conversation, prompt included.
            {"prompt": PROMPT_MSGS, "chosen": PROMPT_MSGS + [{"role": "assistant", "content": "Hello"}],
             "rejected": PROMPT_MSGS + [{"role": "assistant", "content": "Go away"}]}]
    data, _ = encode(tok, rows)
    batch = one_batch(data, tok.pad_token_id)
    check_pair_rows(batch, tok.pad_token_id)
    for b in range(2):
        assert (trained(tok, batch, b, 0), trained(tok, batch, b, 1)) == ("Hello" + EOS, "Go away" + EOS)
    np.testing.assert_array_equal(batch["tokens"][0], batch["tokens"][1])
    prompt = tok.apply_chat_template(PROMPT_MSGS, tokenize=False, add_generation_prompt=True)
    assert tok.decode(batch["tokens"][0, 0, :batch["prompt_len"][0]].tolist()) == prompt


def test_hh_strings_split_at_the_last_common_assistant_opener(tok):
    row = {"chosen": HH_PROMPT + " 7", "rejected": HH_PROMPT + " 8, I think"}
    data, stats = encode(tok, [row])
    assert stats.format == "hh_rlhf"
    batch = one_batch(data, tok.pad_token_id)
    check_pair_rows(batch, tok.pad_token_id)
    # The earlier assistant turn ("5") is prompt: never trained.
    assert (trained(tok, batch, 0, 0), trained(tok, batch, 0, 1)) == ("7" + EOS, "8, I think" + EOS)
    msgs = [{"role": "user", "content": "what is 2 plus 3?"}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "and 3 plus 4?"}]
    p = int(batch["prompt_len"][0])
    assert tok.decode(batch["tokens"][0, 0, :p].tolist()) == tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)


def test_hh_strings_without_a_template_are_plain_text(tok_plain):
    data, _ = encode(tok_plain, [{"chosen": HH_PROMPT + " 7", "rejected": HH_PROMPT + " 8"}])
    batch = one_batch(data, tok_plain.pad_token_id)
    check_pair_rows(batch, tok_plain.pad_token_id)
    p = int(batch["prompt_len"][0])
    assert tok_plain.decode(batch["tokens"][0, 0, :p].tolist()) == HH_PROMPT
    assert (trained(tok_plain, batch, 0, 0), trained(tok_plain, batch, 0, 1)) == (" 7" + EOS, " 8" + EOS)


def test_hh_message_lists_diverging_at_a_human_turn(tok, tok_plain):
    u = lambda c: {"role": "user", "content": c}
    a = lambda c: {"role": "assistant", "content": c}
    row = {"chosen": [u("Hi"), a("Hello"), u("Sing"), a("La la")],
           "rejected": [u("Hi"), a("Hello"), u("Dance"), a("No")]}
    data, _ = encode(tok, [row])
    batch = one_batch(data, tok.pad_token_id)
    check_pair_rows(batch, tok.pad_token_id)
    # The prompt ends before the last common assistant turn; the later turns are the response,
    # whose assistant turns (only) are trained.
    assert trained(tok, batch, 0, 0) == "Hello" + EOS + "La la" + EOS
    assert trained(tok, batch, 0, 1) == "Hello" + EOS + "No" + EOS
    assert tok.decode(batch["tokens"][0, 0, :batch["prompt_len"][0]].tolist()) == \
        tok.apply_chat_template([u("Hi")], tokenize=False, add_generation_prompt=True)
    with pytest.raises(DataError, match=r"d\.jsonl: row 0 \(line 1\): chat-format preference data "
                                        r"needs a chat template.*data\.chat_template"):
        encode(tok_plain, [row])
    data, _ = encode(tok_plain, [row], chat_template=tok.chat_template)  # from the config instead
    np.testing.assert_array_equal(one_batch(data, 2)["tokens"], batch["tokens"])


def test_split_rule():
    t = lambda *turns: [(r, c) for r, c in turns]
    h, a = "user", "assistant"
    base = [(h, "q1"), (a, "a1"), (h, "q2")]
    assert split_turn(t(*base, (a, "x")), t(*base, (a, "y"))) == 3
    # One conversation is a prefix of the other: the shorter's last answer is its response.
    assert split_turn(t(*base, (a, "x")), t(*base, (a, "x"), (h, "q3"), (a, "z"))) == 3
    assert split_turn(t(*base, (a, "x")), t(*base[:2], (h, "other"), (a, "x"))) == 1
    with pytest.raises(NoPrompt):
        split_turn(t((h, "q1"), (a, "x")), t((h, "q2"), (a, "x")))
    with pytest.raises(Identical):
        split_turn(t(*base, (a, "x")), t(*base, (a, "x")))


def test_smollm2_tokenizer_masks(smollm2_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tok.pad_token_id == tok.eos_token_id
    rows = [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "London."},
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Paris.",
             "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Capital of France?\n\nAssistant: Rome."}]
    for row, chosen, rejected in [(rows[0], "Paris.", "London."), (rows[1], "Paris.", "Rome.")]:
        data, _ = encode(tok, [row])
        batch = one_batch(data, tok.pad_token_id)
        check_pair_rows(batch, tok.pad_token_id)
        assert (trained(tok, batch, 0, 0), trained(tok, batch, 0, 1)) == (chosen + EOS, rejected + EOS)
        prompt = tok.decode(batch["tokens"][0, 0, :batch["prompt_len"][0]].tolist())
        assert prompt.endswith("Capital of France?<|im_end|>\n<|im_start|>assistant\n")


# ---- batches and loaders ------------------------------------------------------------------

def make_files(tmp_path, n=10):
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"}
            for i in range(n)]
    hh = [{"chosen": f"\n\nHuman: sum {i}\n\nAssistant: {i}", "rejected": f"\n\nHuman: sum {i}\n\nAssistant: no"}
          for i in range(n // 2)]
    return write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", hh)


def test_batch_layout_shapes_and_dtypes(tok, tmp_path, cache):
    a, b = make_files(tmp_path)
    cfg = DataConfig(train=[a, {"path": b, "weight": 0.5}], seq_len=48, cache_dir=cache, seed=2)
    data = build_preference_data(cfg, tok, batch_size=4)
    batch = next(data.train)
    assert tuple(batch) == PREF_BATCH_KEYS
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "tokens": ((4, 2, 48), "int32"), "targets": ((4, 2, 48), "int32"),
        "loss_mask": ((4, 2, 48), "float32"), "segment_ids": ((4, 2, 48), "int32"),
        "positions": ((4, 2, 48), "int32"), "prompt_len": ((4,), "int32"),
        "pair_mask": ((4,), "float32"), "margin": ((4,), "float32")}
    assert (batch["pair_mask"] == 1).all() and data.pad_id == tok.pad_token_id
    check_pair_rows(batch, data.pad_id)
    # Flattening the pair axis gives SFT-shaped rows, chosen and rejected interleaved.
    flat = batch["tokens"].reshape(8, 48)
    np.testing.assert_array_equal(flat[1], batch["tokens"][0, 1])
    assert data.stats.total().kept == 15 and "a.jsonl: 10 rows -> 10 pairs" in data.stats.summary()


def test_loader_resume_and_process_slices(tok, tmp_path, cache):
    a, b = make_files(tmp_path)
    cfg = DataConfig(train=[a, {"path": b, "weight": 0.5}], seq_len=48, cache_dir=cache, seed=2)
    original = build_preference_data(cfg, tok, batch_size=4).train
    for _ in range(5):  # past epoch boundaries of both sets
        next(original)
    state = json.loads(json.dumps(original.state()))
    fresh = build_preference_data(cfg, tok, batch_size=4).train
    fresh.restore(state)
    parts = [build_preference_data(cfg, tok, batch_size=4, process_index=i, process_count=2).train
             for i in range(2)]
    for p in parts:
        p.restore(state)
    for _ in range(4):
        x, y = original.next_global(), next(fresh)
        halves = [next(p) for p in parts]
        for k in PREF_BATCH_KEYS:
            np.testing.assert_array_equal(x[k], y[k])
            assert halves[0][k].shape[0] == 2
            np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), x[k])
    other = build_preference_data(cfg.replace(seed=3), tok, batch_size=4).train
    with pytest.raises(DataError, match="loader state does not match this data: seed"):
        other.restore(state)


def test_eval_loader_all_pairs_in_order_with_filler_pairs(tok, tmp_path, cache):
    a, _ = make_files(tmp_path)
    cfg = DataConfig(train=[a], eval_fraction=0.5, seq_len=48, cache_dir=cache)
    data = build_preference_data(cfg, tok, batch_size=2, eval_batch_size=4)
    assert len(data.train.datasets[0]) == 5 and len(data.eval.dataset) == 5
    batches = list(data.eval)
    assert len(batches) == len(data.eval) == 2  # 5 pairs -> 4 + 1 real and 3 filler pairs
    assert batches[1]["pair_mask"].tolist() == [1, 0, 0, 0]
    filler = {k: batches[1][k][1:] for k in PREF_BATCH_KEYS}
    assert (filler["segment_ids"] == 0).all() and (filler["loss_mask"] == 0).all()
    assert (filler["prompt_len"] == 0).all() and (filler["tokens"] == data.pad_id).all()
    chosen = [trained(tok, bt, r, 0) for bt in batches for r in range(4) if bt["pair_mask"][r]]
    held = [data.eval.dataset[i] for i in range(5)]
    assert chosen == [tok.decode(c[0][c[1] == 1].tolist()) for c, *_ in held]  # in order
    halves = [build_preference_data(cfg, tok, batch_size=2, eval_batch_size=4, process_index=i,
                                    process_count=2).eval for i in range(2)]
    for g, x, y in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([x["pair_mask"], y["pair_mask"]]), g["pair_mask"])
        np.testing.assert_array_equal(np.concatenate([x["tokens"], y["tokens"]]), g["tokens"])


# ---- policies -----------------------------------------------------------------------------

def test_identical_pairs_dropped_and_counted_or_an_error(tok, tmp_path, cache, caplog):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": PROMPT_MSGS, "chosen": [{"role": "assistant", "content": "x"}], "rejected": "x"}]
    _, stats = encode(tok, rows)
    assert (stats.kept, stats.dropped_identical) == (1, 2)
    assert "d.jsonl: dropped 2 pair(s) (identical), the first: d.jsonl: row 1 (line 2)" in caplog.text
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    cfg = DataConfig(train=[path], on_identical="error", cache_dir=cache)
    with pytest.raises(DataError, match=r"i\.jsonl: row 1 \(line 2\): chosen and rejected are identical "
                                        r"\(set data\.on_identical: drop"):
        build_preference_data(cfg, tok, batch_size=1)
    _, stats = encode(tok, [{"chosen": HH_PROMPT + " 7", "rejected": HH_PROMPT + " 7"}])
    assert stats.dropped_identical == 1


def test_identical_after_truncation():
    rows = [{"prompt": "q", "chosen": "long answer A", "rejected": "long answer B"}]
    _, stats = encode(CharTok(), rows, seq_len=8)
    assert (stats.kept, stats.dropped_identical) == (0, 1)
    with pytest.raises(DataError, match=r"row 0 \(line 1\): chosen and rejected are identical after "
                                        r"truncation to 8 tokens"):
        encode(CharTok(), rows, seq_len=8, on_identical="error")


def test_empty_response_dropped_or_error(tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": " ", "rejected": "b"},
            {"prompt": "p", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"},
            {"chosen": "\n\nHuman: x\n\nAssistant: ok", "rejected": "\n\nHuman: x\n\nAssistant:  "}]
    _, stats = encode(tok, rows[:3])
    assert (stats.kept, stats.dropped_empty) == (1, 2)
    _, stats = encode(tok, rows[3:])
    assert (stats.kept, stats.dropped_empty) == (0, 1)
    with pytest.raises(DataError, match=r"d\.jsonl: row 1 \(line 2\): empty 'chosen' \(set data\.on_empty"):
        encode(tok, rows, on_empty="error")


def test_no_common_prompt_is_dropped_and_counted(tok):
    rows = [{"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
            {"prompt": "", "chosen": "x", "rejected": "y"}]
    _, stats = encode(tok, rows[:1])
    assert (stats.kept, stats.dropped_no_prompt) == (0, 1)
    _, stats = encode(tok, rows[1:], fmt="preference")
    assert stats.dropped_no_prompt == 1


def test_long_prompt_keep_end_or_drop():
    tok = CharTok()
    rows = [{"prompt": "0123456789", "chosen": "yes", "rejected": "no"},
            {"prompt": "ab", "chosen": "yes", "rejected": "no"}]
    data, stats = encode(tok, rows, seq_len=16, max_prompt_len=5)
    assert (stats.kept, stats.prompt_truncated) == (2, 1)
    batch = one_batch(data, tok.pad_token_id, seq_len=16)
    check_pair_rows(batch, tok.pad_token_id)
    # BOS kept, then the last 4 prompt characters; the response is whole, EOS included.
    assert tok.decode(batch["tokens"][0, 0].tolist()) == "<s>6789yes</s>" + "_" * 7
    assert batch["prompt_len"].tolist() == [5, 3]
    assert trained(tok, batch, 0, 0) == "yes</s>" and trained(tok, batch, 0, 1) == "no</s>"
    _, stats = encode(tok, rows, seq_len=16, max_prompt_len=5, prompt_truncation="drop")
    assert (stats.kept, stats.dropped_long_prompt, stats.prompt_truncated) == (1, 1, 0)


def test_over_long_pairs_truncate_the_response_end_or_drop():
    tok = CharTok()
    rows = [{"prompt": "q", "chosen": "a long long answer", "rejected": "no"},
            {"prompt": "a very long prompt indeed", "chosen": "x", "rejected": "y"},
            {"prompt": "q", "chosen": "ok", "rejected": "no"}]
    data, stats = encode(tok, rows, seq_len=10)
    assert (stats.kept, stats.truncated, stats.dropped_no_loss, stats.truncated_no_loss) == (2, 2, 1, 1)
    batch = one_batch(data, tok.pad_token_id, seq_len=10)
    assert tok.decode(batch["tokens"][0, 0].tolist()) == "<s>qa long l"    # response end cut, no EOS
    assert trained(tok, batch, 0, 0) == "a long l" and trained(tok, batch, 0, 1) == "no</s>"
    _, stats = encode(tok, rows, seq_len=10, truncation="drop")
    assert (stats.kept, stats.dropped_too_long, stats.truncated) == (1, 2, 0)


def test_bad_rows_name_file_row_and_field(tok, tmp_path, cache):
    ok = {"prompt": "p", "chosen": "a", "rejected": "b"}
    cases = [
        ([ok, {"prompt": "p", "chosen": "a"}], r"row 1 \(line 2\): missing field 'rejected'"),
        ([ok, {"chosen": "a", "rejected": "b"}], r"row 1 \(line 2\): missing field 'prompt'"),
        ([ok, {"prompt": "p", "chosen": 5, "rejected": "b"}],
         r"row 1 \(line 2\): field 'chosen' must be a string or a list of messages, got int"),
        ([ok, {"prompt": "p", "chosen": "", "rejected": [{"role": "assistant", "content": 3}]}],
         r"row 1 \(line 2\): field 'rejected\[0\]\.content' must be a string, got int"),
        ([{"chosen": "just text", "rejected": "\n\nHuman: a\n\nAssistant: b"}],
         r"row 0 \(line 1\): field 'chosen' is not an HH-RLHF conversation"),
    ]
    for i, (rows, msg) in enumerate(cases):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", rows)
        with pytest.raises(DataError, match=rf"bad{i}\.jsonl: {msg}"):
            build_preference_data(DataConfig(train=[path], cache_dir=cache), tok, batch_size=1)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match=r"cannot detect a preference format from the first row's keys \['text'\]"):
        build_preference_data(DataConfig(train=[path], cache_dir=cache), tok, batch_size=1)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "a"}])
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable pairs after filtering \(1 rows; "
                                        r"dropped 0 empty, 0 no prompt, 1 identical"):
        build_preference_data(DataConfig(train=[empty], cache_dir=cache), tok, batch_size=1)


def test_config_fields_and_refusals(tok):
    cfg = DataConfig(train=["a.jsonl"])
    assert (cfg.max_prompt_len, cfg.prompt_truncation, cfg.on_identical) == (None, "keep_end", "drop")
    for kw, msg in [(dict(max_prompt_len=8, seq_len=8), r"data\.max_prompt_len must be null or an integer in \[1, seq_len=8\)"),
                    (dict(prompt_truncation="left"), "data.prompt_truncation 'left' is not one of"),
                    (dict(on_identical="keep"), "data.on_identical 'keep' is not one of")]:
        with pytest.raises(ConfigError, match=msg):
            DataConfig(train=["a.jsonl"], **kw)
    with pytest.raises(ConfigError, match="data.pack: preference pairs are not packed"):
        build_preference_data(cfg.replace(pack=True), tok, batch_size=1)
    with pytest.raises(ConfigError, match="data.train_on_prompt"):
        build_preference_data(cfg.replace(train_on_prompt=True), tok, batch_size=1)


# ---- prompts only -------------------------------------------------------------------------

def test_load_prompts_match_the_training_prefix(tok, tok_plain, tmp_path, cache):
    a, b = make_files(tmp_path, n=4)
    texts = load_prompts(a, tok, cache_dir=cache).rendered
    assert texts[1] == tok.apply_chat_template([{"role": "user", "content": "What is 1 plus 1?"}],
                                               tokenize=False, add_generation_prompt=True)
    cfg = DataConfig(train=[a], seq_len=48, cache_dir=cache, shuffle=False)
    batch = next(build_preference_data(cfg, tok, batch_size=4).train)
    ids = load_prompts(a, tok, cache_dir=cache).ids
    for r in range(4):
        assert ids[r] == batch["tokens"][r, 0, :batch["prompt_len"][r]].tolist()
    assert load_prompts(b, tok_plain, cache_dir=cache).rendered[0] == "\n\nHuman: sum 0\n\nAssistant:"
    short = load_prompts(a, tok, max_prompt_len=6, cache_dir=cache)
    assert [len(x) for x in short.ids] == [6] * 4 and short.ids[0] == ids[0][-6:]
    dropped = load_prompts(a, tok, max_prompt_len=len(ids[0]), too_long="drop", cache_dir=cache)
    assert dropped.rows == [r for r in range(4) if len(ids[r]) <= len(ids[0])]
    chat = write_jsonl(tmp_path / "tasks.jsonl", tasks.make_tasks(3, seed=1))  # SFT chat rows
    prompts = load_prompts(chat, tok, cache_dir=cache)
    user = tasks.make_tasks(3, seed=1)[0]["messages"][0]["content"]
    assert prompts.rendered[0].endswith(user + EOS + "\n<|im_start|>assistant\n")
    assert prompts.texts[0] == user  # what a reward function sees: the last user turn


# ---- the synthetic generator --------------------------------------------------------------

def test_prefs_generator_is_deterministic_disjoint_and_right(tmp_path):
    rows, keys = prefs.make_prefs(300, seed=5)
    assert rows == prefs.make_prefs(300, seed=5)[0] and rows != prefs.make_prefs(300, seed=6)[0]
    counts = Counter(r["kind"] for r in rows)
    assert counts == {k: 100 for k in prefs.KINDS}
    assert len({r["prompt"] for r in rows}) == len(keys) == 300
    assert all(r["chosen"] != r["rejected"] for r in rows)
    correct = [r for r in rows if r["kind"] == "correct"]
    assert len({r["task"] for r in correct}) == len(tasks.ALL_KINDS)
    right = tasks.exact_match([r["chosen"] for r in correct], [r["answer"] for r in correct])
    wrong = tasks.exact_match([r["rejected"] for r in correct], [r["answer"] for r in correct])
    assert right["exact_match"] == 1.0 and wrong["exact_match"] == 0.0
    for r in correct:
        if r["task"] == "arithmetic":  # recomputed here, independently of tasks.py
            a, op, b = int(r["args"][0]), r["args"][1], int(r["args"][2])
            assert r["chosen"].endswith(f"= {eval(f'{a} {op} {b}')}")
    for r in rows:
        if r["kind"] == "concise":
            assert r["chosen"] == r["answer"] and r["answer"] in r["rejected"]
            assert len(r["rejected"]) > 3 * len(r["chosen"])
        if r["kind"] == "format" and "JSON" in r["prompt"]:
            assert json.loads(r["chosen"]) == {"answer": r["answer"]} and r["rejected"] == r["answer"]
        if r["kind"] == "format" and "uppercase" in r["prompt"]:
            assert r["chosen"] == r["answer"].upper() != r["rejected"]
    assert prefs.main([str(tmp_path), "--train", "60", "--eval", "30", "--seed", "1"]) == 0
    train = tasks.read_jsonl(tmp_path / "train.jsonl")
    evl = tasks.read_jsonl(tmp_path / "eval.jsonl")
    assert (len(train), len(evl)) == (60, 30)
    assert evl == prefs.make_prefs(30, seed=1, split="eval")[0]  # eval does not depend on n_train
    key = lambda r: json.dumps([r["task"], r["args"]])
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evl}
    assert not {key(r) for r in train} & {key(r) for r in evl}  # not even the same question reworded


def test_prefs_file_goes_through_the_pipeline(tok, tmp_path, cache):
    train, evl = prefs.write_splits(tmp_path, 30, 9, seed=0)
    cfg = DataConfig(train=[str(train)], eval=[str(evl)], seq_len=256, cache_dir=cache)
    data = build_preference_data(cfg, tok, batch_size=3)
    assert data.stats.total().kept == 30 and data.eval_stats.total().kept == 9
    assert sum(data.stats.total().dropped().values()) == 0
    batch = next(data.train)
    check_pair_rows(batch, data.pad_id)
    assert all(len(b["tokens"]) == 3 for b in data.eval)
