"""`jaxalign eval` and `jaxalign generate --prompts`: ROUGE-L against rouge-score, exact match,
token-weighted perplexity against transformers, the tiny eval config end to end, batch
generation to JSONL with one compile per length bucket, and one-line config errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxalign.config import ConfigError
from jaxalign.evaluate import from_raw, load_config, run_eval
from jaxalign.evaluate.text_metrics import exact_match, rouge_l

ROOT = Path(__file__).resolve().parents[1]
TINY_EVAL = ROOT / "configs" / "tiny_eval.yaml"


# ----------------------------------------------------------------------------- text metrics

PAIRS = [("the cat sat on the mat", "the cat sat"),
         ("The Cat sat.", "the cat sat"),
         ("a b c d e", "e d c b a"),
         ("police killed the gunman", "the gunman police killed"),
         ("", "nothing generated"),
         ("Paris is the capital of France", "The capital of France is Paris."),
         ("running runs ran", "run running")]


@pytest.mark.parametrize("stemmer", [False, True])
def test_rouge_l_equals_rouge_score(stemmer):
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stemmer)
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    ours = rouge_l(preds, refs, use_stemmer=stemmer)
    theirs = [scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_rouge_l_by_hand():
    """LCS worked out by hand: P = LCS / |pred|, R = LCS / |ref|, F = 2PR / (P + R)."""
    # "the cat sat on the mat" vs "the cat sat": LCS 3, P = 3/6, R = 1 -> F = 2/3.
    # "police killed the gunman" vs "the gunman police killed": LCS 2 -> P = R = F = 1/2.
    # "a b c d e" vs its reverse: LCS 1 -> 1/5.  No tokens at all: 0.
    got = rouge_l([p for p, _ in PAIRS[:5]], [r for _, r in PAIRS[:5]])
    np.testing.assert_allclose(got, [2 / 3, 1.0, 0.2, 0.5, 0.0], atol=1e-12)


def test_exact_match():
    preds = ["42", " 42. ", "42.0", "Paris", "paris", "", "a  b"]
    refs = ["42", "42", "42", "Paris.", "Paris", "", "a b"]
    assert exact_match(preds, refs) == [True, True, False, True, False, True, False]
    with pytest.raises(ValueError, match="2 completions for 1 references"):
        exact_match(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two tiny policies (same tokenizer, different weights), a tiny reward model, and the
    synthetic task and preference sets."""
    from make_tiny_model import make_tiny_model
    from jaxalign import checkpoint
    from jaxalign.convert import hf
    from jaxalign.synth import prefs, tasks

    root = tmp_path_factory.mktemp("eval")
    sft = make_tiny_model(root / "sft", seed=0)
    dpo = make_tiny_model(root / "dpo", tokenizer_dir=sft, seed=1)
    cfg, params, hf_config, _ = checkpoint.load_model(sft, num_labels=1, seed=3)
    rm = hf.save(root / "rm", cfg, params, hf_config=hf_config, source_dir=sft)
    _, task_eval = tasks.write_splits(root / "tasks", 0, 20, seed=0)
    _, pref_eval = prefs.write_splits(root / "prefs", 0, 20, seed=0)
    return dict(root=root, sft=Path(sft), dpo=Path(dpo), rm=Path(rm), tasks=task_eval,
                prefs=pref_eval)


def _overrides(world, out_dir):
    return [f"out_dir={out_dir}", f"models.policies.sft={world['sft']}",
            f"models.policies.dpo={world['dpo']}", f"models.reward_model={world['rm']}",
            f"data.pairs=[{world['prefs']}]", f"data.prompts=[{world['tasks']}]",
            f"data.heldout=[{world['tasks']}]"]


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_eval(world):
    out = world["root"] / "out"
    cfg = load_config(str(TINY_EVAL), _overrides(world, out))
    return cfg, run_eval(cfg), out


@pytest.mark.slow  # an eval run end to end
def test_tiny_eval_config_end_to_end(tiny_eval):
    cfg, results, out = tiny_eval
    assert set(cfg.models.policies) == {"sft", "dpo"} and cfg.models.reference == "sft"
    n = cfg.eval.limit
    for name in ("sft", "dpo"):
        for key in ("ppl/{}/perplexity", "gen/{}/rouge_l", "gen/{}/exact_match",
                    "gen/{}/reward", "gen/{}/length"):
            assert key.format(name) in results, (key, sorted(results))
        assert results[f"gen/{name}/prompts"] == n
        assert 1 < results[f"ppl/{name}/perplexity"] < 1e4
    for key in ("rm/accuracy", "dpo/dpo/accuracy", "winrate/dpo", "kl/dpo/sequence",
                "kl/dpo/per_token"):
        assert key in results, key
    assert results["rm/pairs"] == n and results["dpo/dpo/pairs"] == n
    assert 0 <= results["winrate/dpo"] <= 1
    assert "winrate/sft" not in results and "kl/sft/sequence" not in results  # the baseline

    assert json.loads((out / "eval.json").read_text()) == pytest.approx(results)
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["reference"] == "sft" and set(summary["models"]) == {"sft", "dpo"}
    assert summary["table"]["dpo"]["winrate"] == results["winrate/dpo"]
    assert summary["table"]["sft"]["ppl/perplexity"] == results["ppl/sft/perplexity"]
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == cfg.eval.samples
    assert {k for k in samples[0] if "/" in k} == {"completion/sft", "completion/dpo",
                                                   "reward/sft", "reward/dpo"}
    assert all(s["answer"] for s in samples)
    gens = [json.loads(l) for l in (out / "generations_dpo.jsonl").read_text().splitlines()]
    assert len(gens) == n
    assert [g["completion"] for g in gens[:len(samples)]] == [s["completion/dpo"] for s in samples]


@pytest.mark.slow  # an eval run end to end
def test_generation_metrics_match_the_written_completions(tiny_eval):
    """ROUGE-L / exact match / reward in the results are the means over the completions and
    rewards written to generations_<name>.jsonl, recomputed here with rouge-score itself."""
    from rouge_score import rouge_scorer
    _, results, out = tiny_eval
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for name in ("sft", "dpo"):
        rows = [json.loads(l) for l in (out / f"generations_{name}.jsonl").read_text().splitlines()]
        rl = np.mean([scorer.score(r["answer"], r["completion"])["rougeL"].fmeasure for r in rows])
        assert results[f"gen/{name}/rouge_l"] == pytest.approx(rl, abs=1e-9)
        em = np.mean([r["completion"].strip() == r["answer"].strip() for r in rows])
        assert results[f"gen/{name}/exact_match"] == pytest.approx(em)
        assert results[f"gen/{name}/reward"] == pytest.approx(np.mean([r["reward"] for r in rows]))


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_kl_of_the_reference_to_itself_is_zero(world, tmp_path):
    """The same model as policy and reference: every log-prob difference is exactly 0."""
    raw = {"models": {"policies": {"a": str(world["sft"]), "b": str(world["sft"])},
                      "reference": "a"},
           "data": {"prompts": [str(world["tasks"])]},
           "eval": {"limit": 4, "batch_size": 4, "max_new_tokens": 4}}
    results = run_eval(from_raw(raw))
    assert results["kl/b/sequence"] == 0.0 and results["kl/b/per_token"] == 0.0


def test_perplexity_equals_transformers(world):
    """Token-weighted over the held-out assistant tokens: sum of HF's per-example mean loss
    times its token count, over all tokens, from transformers' LlamaForCausalLM."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from jaxalign.evaluate import likelihood
    from jaxalign.evaluate.run import load

    m = load("sft", str(world["sft"]), "float32")
    from jaxalign.data.config import DatasetSpec
    sets = likelihood.heldout_sets([DatasetSpec(path=str(world["tasks"]))], m.tokenizer,
                                   seq_len=64, chat_template=None, cache_dir=None)
    ours = likelihood.perplexity(m.cfg, m.params, sets, seq_len=64, batch_size=3, pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(world["sft"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    data = sets[0]
    for i in range(len(data)):
        ids, mask = data[i]
        labels = np.where(mask > 0, ids, -100)
        n = int((labels[1:] != -100).sum())
        with torch.no_grad():
            loss = model(torch.tensor(ids[None], dtype=torch.long),
                         labels=torch.tensor(labels[None], dtype=torch.long)).loss.item()
        total += loss * n
        count += n
    assert ours["tokens"] == count > 0
    assert ours["nll"] == pytest.approx(total / count, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_completion_logps_and_kl_equal_transformers(world):
    """Sum of log p(completion | prompt) under each model, from transformers' logits, for the
    dpo policy's own sampled completions (temperature 1); KL estimate = their mean difference."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM
    from jaxalign.evaluate import likelihood
    from jaxalign.evaluate.generation import read_prompts, sample
    from jaxalign.evaluate.run import load

    pol, ref = load("dpo", str(world["dpo"]), "float32"), load("sft", str(world["sft"]), "float32")
    prompts = read_prompts(str(world["tasks"]), pol.tokenizer, chat=True).ids[:5]
    comps = sample(pol.cfg, pol.params, prompts, batch_size=4, max_new_tokens=6, temperature=1.0,
                   seed=1, eos_ids=(2,), pad_id=2)
    ours = {m.name: likelihood.completion_logps(m.cfg, m.params, prompts, comps, batch_size=4,
                                                pad_id=2)[0] for m in (pol, ref)}
    for m in (pol, ref):
        hf_model = AutoModelForCausalLM.from_pretrained(world[m.name], dtype=torch.float32).eval()
        theirs = []
        for p, c in zip(prompts, comps):
            ids = torch.tensor([list(p) + list(c)])
            with torch.no_grad():
                logp = torch.log_softmax(hf_model(ids).logits[0].double(), -1)
            theirs.append(sum(float(logp[len(p) - 1 + t, tok]) for t, tok in enumerate(c)))
        np.testing.assert_allclose(ours[m.name], theirs, rtol=1e-5, atol=1e-4)
    assert abs((ours["dpo"] - ours["sft"]).mean()) > 1e-3  # two different models


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_pair_logps_equal_the_dpo_trainers(world):
    """The DPO-implied reward's log-probs (pairs as one row each) are the ones the DPO trainer
    optimises (here on two rows a pair)."""
    import jax.numpy as jnp
    from jaxalign.data.config import DataConfig, DatasetSpec
    from jaxalign.data.preference import PrefEvalLoader, load_pairs
    from jaxalign.data.tokenize import Encoder
    from jaxalign.evaluate import likelihood
    from jaxalign.evaluate.run import load
    from jaxalign.data.layout import branch_layout
    from jaxalign.train.dpo import pair_logps

    m = load("dpo", str(world["dpo"]), "float32")
    spec = DatasetSpec(path=str(world["prefs"]))
    pairs, _ = load_pairs(spec, DataConfig(train=[spec], seq_len=192), Encoder(m.tokenizer))
    ours = likelihood.pair_logps(m.cfg, m.params, pairs, seq_len=192, batch_size=8, pad_id=2)
    theirs = np.concatenate([
        np.asarray(pair_logps(m.cfg, m.params, {k: jnp.asarray(v) for k, v in branch_layout(
            b, share=False, pad_id=2).items()}, average=False, chunk=128))[b["pair_mask"] > 0]
        for b in PrefEvalLoader(pairs, seq_len=192, batch_size=8, pad_id=2)])
    assert ours.shape == (20, 2)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-4)


# ----------------------------------------------------------------------------- generate --prompts

@pytest.mark.slow  # over 3 s: outside the fast tier
def test_generate_prompts_file_to_jsonl(world, tmp_path, capsys):
    """A .txt file of 5 prompts (a blank line skipped), batches of 2: every prompt gets a row
    in order, and a row equals `generate --prompt` on that prompt alone (greedy)."""
    from jaxalign import cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2 plus 3?\n\nwrite a list of three colors\nyes\nno\nred green\n")
    out = tmp_path / "out.jsonl"
    argv = ["generate", str(world["sft"]), "--prompts", str(prompts), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 2 plus 3?", "write a list of three colors",
                                           "yes", "no", "red green"]
    assert all(1 <= r["tokens"] <= 6 and isinstance(r["completion"], str) for r in rows)
    capsys.readouterr()
    assert cli.main(["generate", str(world["sft"]), "--prompt", "yes", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == rows[2]["completion"]
    # Without --out the rows go to stdout, one JSON object a line.
    assert cli.main(argv[:-6] + ["--batch-size", "2", "--max-new-tokens", "6"]) == 0
    assert [json.loads(l) for l in capsys.readouterr().out.splitlines()] == rows
    with pytest.raises(SystemExit) as e:  # --out without --prompts: a usage error
        cli.main(["generate", str(world["sft"]), "--prompt", "hi", "--out", str(out)])
    assert e.value.code == 2 and "--out needs --prompts" in capsys.readouterr().err


def test_generate_from_a_dataset_compiles_once_per_length_bucket(world):
    """Prompt rows of a JSONL dataset (their other columns kept), 20 prompts in batches of 3:
    one compiled sampler program per prompt-length bucket, the short last batch included."""
    from jaxalign.evaluate.generation import generate_file, pad_id_of, read_prompts
    from jaxalign.evaluate.run import load
    from jaxalign.generate import bucket_length, eos_ids_for, make_generate_fn

    m = load("sft", str(world["sft"]), "float32")
    rows = generate_file(m.cfg, m.params, m.tokenizer, str(world["tasks"]), chat=True,
                         batch_size=3, max_new_tokens=5)
    assert len(rows) == 20 and all("answer" in r and "kind" in r for r in rows)
    ids = read_prompts(str(world["tasks"]), m.tokenizer, chat=True).ids
    lengths = {bucket_length(max(len(x) for x in ids[i:i + 3])) for i in range(0, 20, 3)}
    fn = make_generate_fn(m.cfg, 5, 0.0, 0, 1.0, eos_ids_for(m.tokenizer),
                          pad_id_of(m.tokenizer))
    assert fn._cache_size() == len(lengths), (fn._cache_size(), lengths)


# ----------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("raw, message", [
    ({"policy": "x", "data": {"prompts": ["p"]}}, "key 'policy' moved to models.policies"),
    ({"models": {"policies": {"a": "x"}}, "seq_len": 8}, "key 'seq_len' moved to eval.seq_len"),
    ({"data": {"prompts": ["p"]}}, "missing key 'models'"),
    ({"models": {"reward_model": "r"}, "data": {"prompts": ["p"]}}, "missing key 'models.policies'"),
    ({"models": {"policies": {"a": "x"}}}, "nothing to measure"),
    ({"models": {"policies": {"a b": "x"}}, "data": {"prompts": ["p"]}}, "models.policies: name 'a b'"),
    ({"models": {"policies": {"a": "x"}}, "data": {"prompts": ["p"]}, "eval": {"batch_size": 0}},
     "eval.batch_size must be >= 1"),
    ({"models": {"policies": {"a": "x"}}, "data": {"prompts": ["p"]}, "eval": {"bogus": 1}},
     "unknown config key 'eval.bogus'"),
    ({"models": {"policies": {"a": "x"}}, "lm_eval": {"task_file": "t.yaml", "policies": ["b"]}},
     "lm_eval.policies: 'b' is not in models.policies"),
])
def test_config_errors_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        from_raw(raw)


# ----------------------------------------------------------------------------- lm-eval (extra)

TASK = """task: tiny_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} Answer:"
doc_to_choice: ["yes", "no"]
doc_to_target: label
metric_list:
  - metric: acc
"""


def _task_file(tmp_path) -> Path:
    rows = [{"question": f"Is {a} plus {b} equal to {a + b + i % 2}?", "label": i % 2}
            for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (9, 1)])]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tiny_yesno.yaml"
    task.write_text(TASK.format(data=data))
    return task


def test_lm_eval_without_the_extra_is_one_line(world, tmp_path):
    try:
        import lm_eval  # noqa: F401
        pytest.skip("lm-eval is installed")
    except ImportError:
        pass
    from jaxalign import cli
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"models: {{policies: {{sft: {world['sft']}}}}}\n"
                   f"lm_eval: {{task_file: {_task_file(tmp_path)}}}\n")
    with pytest.raises(Exception, match=r"pip install 'jaxalign\[lmeval\]'"):
        run_eval(load_config(str(cfg)))
    assert cli.main(["eval", str(cfg)]) == 1


def test_lm_eval_task_score_is_folded_into_the_results(world, tmp_path):
    """A local multiple-choice task run by the harness on the tiny policy; its accuracy equals
    the one our own log-probs give (argmax over the choices' continuation log-likelihoods,
    context and continuation split as the harness' HF model splits them)."""
    pytest.importorskip("lm_eval")
    from jaxalign.evaluate import likelihood
    from jaxalign.evaluate.run import load

    task = _task_file(tmp_path)
    raw = {"models": {"policies": {"sft": str(world["sft"])}},
           "lm_eval": {"task_file": str(task), "batch_size": 2}, "out_dir": str(tmp_path / "out")}
    results = run_eval(from_raw(raw))
    acc = results["lm_eval/sft/tiny_yesno/acc"]

    m = load("sft", str(world["sft"]), "float32")
    enc = lambda s: m.tokenizer(s, add_special_tokens=False).input_ids
    rows = [json.loads(l) for l in (tmp_path / "qa.jsonl").read_text().splitlines()]
    hits = []
    for r in rows:
        ctx = f"{r['question']} Answer:"
        conts = [enc(ctx + " " + c)[len(enc(ctx)):] for c in ("yes", "no")]
        lp, _ = likelihood.completion_logps(m.cfg, m.params, [enc(ctx)] * 2, conts,
                                            batch_size=2, pad_id=0)
        hits.append(int(np.argmax(lp)) == r["label"])
    assert acc == pytest.approx(np.mean(hits))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*eval*.yaml")), ids=lambda p: p.name)
def test_shipped_eval_configs_load(path):
    cfg = load_config(str(path))
    assert cfg.models.policies and cfg.out_dir


def test_reference_resolution(tmp_path):
    """A named policy, a path (named "reference"), or a single run dir's starting model."""
    from jaxalign.evaluate.run import resolve_models
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  path: /models/sft\n")
    base = {"data": {"prompts": ["p.jsonl"]}}
    models = lambda m: resolve_models(from_raw({**base, "models": m}))
    assert models({"policies": str(run)}) == ({"reference": "/models/sft", "policy": str(run)},
                                              "reference")
    assert models({"policies": {"dpo": "/hf/dpo"}}) == ({"dpo": "/hf/dpo"}, None)
    assert models({"policies": {"a": "/x", "b": "/y"}, "reference": "b"}) == (
        {"b": "/y", "a": "/x"}, "b")
    assert models({"policies": {"a": "/x"}, "reference": "/base"}) == (
        {"reference": "/base", "a": "/x"}, "reference")
    with pytest.raises(ConfigError, match="models.policies.reference: the name is taken"):
        models({"policies": {"reference": "/x"}, "reference": "/base"})


def test_reference_answers_by_column():
    from jaxalign.data.prompts import Prompts
    from jaxalign.evaluate.run import reference_answers
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"}]
    p = Prompts("f.jsonl", ["q", "q"], [[1], [1]], columns={"messages": [msgs, None],
                                                           "gold": ["g", 3]})
    assert reference_answers(p, None) == ["a1", None]  # the last assistant turn
    assert reference_answers(p, "gold") == ["g", None]  # not a string: no answer
    with pytest.raises(ConfigError, match="data.answer_field: f.jsonl has no column 'answer'"):
        reference_answers(p, "answer")


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_intervals_written_and_drawn(tiny_eval, tmp_path):
    """Every mean over prompts has its bootstrap interval (recomputed here from the written
    completions), every policy pair its paired difference; the report draws both."""
    from jaxalign.evaluate.intervals import bootstrap_ci, paired_ci
    from jaxalign.report import write_report
    cfg, results, out = tiny_eval
    kw = dict(resamples=cfg.eval.bootstrap, confidence=cfg.eval.confidence, seed=cfg.eval.seed)
    rows = {n: [json.loads(l) for l in (out / f"generations_{n}.jsonl").read_text().splitlines()]
            for n in ("sft", "dpo")}
    for name in ("sft", "dpo"):
        rewards = [r["reward"] for r in rows[name]]
        want = bootstrap_ci(rewards, **kw)
        assert (results[f"gen/{name}/reward/ci_low"], results[f"gen/{name}/reward/ci_high"]) \
            == pytest.approx(want)
        for key in ("gen/{}/length", "gen/{}/exact_match", "gen/{}/rouge_l", "ppl/{}/perplexity"):
            key = key.format(name)
            if key.startswith("ppl/"):   # not a mean over prompts: no interval
                assert f"{key}/ci_low" not in results
                continue
            assert results[f"{key}/ci_low"] <= results[key] <= results[f"{key}/ci_high"], key
    for key in ("winrate/dpo", "kl/dpo/sequence", "rm/accuracy", "dpo/dpo/margin"):
        assert results[f"{key}/ci_low"] <= results[key] <= results[f"{key}/ci_high"], key
    diff, low, high = paired_ci([r["reward"] for r in rows["dpo"]],
                                [r["reward"] for r in rows["sft"]], **kw)
    assert results["diff/dpo/sft/gen/reward"] == pytest.approx(diff)
    assert (results["diff/dpo/sft/gen/reward/ci_low"],
            results["diff/dpo/sft/gen/reward/ci_high"]) == pytest.approx((low, high))
    summary = json.loads((out / "eval_summary.json").read_text())
    metrics = {d["metric"] for d in summary["differences"]}
    assert {"gen/reward", "gen/length", "gen/exact_match", "gen/rouge_l"} <= metrics
    pytest.importorskip("matplotlib")
    rep = write_report(out, tmp_path / "report")
    md = rep["report"].read_text()
    reward = results["gen/dpo/reward"]
    assert f"[{results['gen/dpo/reward/ci_low']:.4g}, {results['gen/dpo/reward/ci_high']:.4g}]" in md
    assert "Paired differences" in md and "dpo - sft" in md and f"{reward:.4g}" in md
    assert any(p.name.endswith("_policies.png") for p in rep["plots"])
