"""Held-out evaluation inside RL runs (`jaxalign/train/rl/heldout.py`): eval/ metrics logged
beside the training metrics and plotted, exact match / ROUGE-L recomputed from the written
completions, the best policy kept (and reproduced greedily from run_dir/best), early stop
after N evaluations without a new best, and byte-exact resume across an evaluation, with the
evaluation leaving the training stream untouched."""

import json

import numpy as np
import pytest

from jaxalign.config import ConfigError
from conftest import ppo_config as config, read_metrics, run_rl_one_device as run

pytestmark = pytest.mark.slow  # whole RL runs with evaluations and resumes


@pytest.fixture(scope="module")
def tiny(ppo_tiny):
    return ppo_tiny


def records(run_dir):
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def heldout(tiny):  # noqa: F811
    path = tiny["root"] / "heldout.jsonl"
    with open(path, "w") as f:   # numbers the training prompts never use
        for i in range(12):
            a, b = 20 + i, 31 + 2 * i
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                                "answer": str(a + b)}) + "\n")
    return path


def _eval_cfg(tiny, heldout, out, *extra):  # noqa: F811
    return config(tiny, out, f"data.eval_prompts={heldout}", "train.eval_every=2",
                  "train.sample_every=0", *extra)


def _evals(rows):
    return [r for r in rows if "eval/reward" in r]


def _expected_stop(values, steps, mode, patience):
    """The patience rule by hand: (best step, step at which the run stops or None)."""
    best, best_step, since = None, None, 0
    for v, s in zip(values, steps):
        if best is None or (v > best if mode == "max" else v < best):
            best, best_step, since = v, s, 0
        else:
            since += 1
        if patience and since >= patience:
            return best_step, s
    return best_step, None


def test_heldout_eval_logged_best_kept_and_early_stop(tiny, heldout, tmp_path):  # noqa: F811
    from rouge_score import rouge_scorer
    from jaxalign import checkpoint
    from jaxalign.evaluate.generation import sample
    from jaxalign.generate import eos_ids_for
    from jaxalign.report import grouped, write_report
    from jaxalign.tokenizer import load_tokenizer

    out = tmp_path / "run"
    cfg = _eval_cfg(tiny, heldout, out, "train.best_metric=reward/digits", "train.best_mode=min",
                    "train.early_stop_patience=2")
    assert cfg.train.best_metric == "eval/reward/digits"
    run(cfg)
    rows = records(out)
    evals = _evals(rows)
    assert [r["step"] for r in evals] == [r["step"] for r in rows if r["step"] % 2 == 0]
    for key in ("eval/reward", "eval/reward/digits", "eval/exact_match", "eval/rouge_l",
                "eval/length", "eval/eos_rate"):
        assert all(np.isfinite(r[key]) for r in evals), key
    assert all("eval/reward" not in r for r in rows if r["step"] % 2)
    # the patience rule, by hand on the logged series: the run stopped where it says
    values = [r["eval/reward/digits"] for r in evals]
    best_step, stop = _expected_stop(values, [r["step"] for r in evals], "min", 2)
    assert stop is not None and stop < cfg.train.iterations, values   # it did stop early
    assert rows[-1]["step"] == stop
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["iteration"] == best_step and best["value"] == min(values)
    # exact match and ROUGE-L: the means over eval_samples.jsonl, recomputed with rouge-score
    written = [json.loads(l) for l in (out / "eval_samples.jsonl").read_text().splitlines()]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for r in evals:
        mine = [w for w in written if w["step"] == r["step"]]
        assert len(mine) == 12
        assert r["eval/exact_match"] == pytest.approx(np.mean(
            [w["completion"].strip().rstrip(".") == w["answer"] for w in mine]))
        assert r["eval/rouge_l"] == pytest.approx(np.mean(
            [scorer.score(w["answer"], w["completion"])["rougeL"].fmeasure for w in mine]))
        assert r["eval/reward"] == pytest.approx(np.mean([w["reward"] for w in mine]))
    # run_dir/best is a run directory: its policy, greedy, writes the best evaluation's text
    mcfg, params, _, tok_dir = checkpoint.load_model(out / "best")
    tok = load_tokenizer(tok_dir)
    from jaxalign.data.prompts import load_prompts
    prompts = load_prompts(str(heldout), tok, chat=True)
    ids = sample(mcfg, params, prompts.ids, batch_size=16, max_new_tokens=8,
                 eos_ids=eos_ids_for(tok), pad_id=tok.pad_token_id)
    at_best = [w["completion"] for w in written if w["step"] == best_step]
    assert [tok.decode(x, skip_special_tokens=True) for x in ids] == at_best
    # a rerun finds the run finished: nothing new
    before = (out / "metrics.jsonl").read_text()
    run(cfg)
    assert (out / "metrics.jsonl").read_text() == before
    # the report plots the eval curves beside the training ones
    groups = grouped(rows)
    assert "eval/exact_match" in groups["eval metrics"] and "eval/reward" in groups["reward"]
    pytest.importorskip("matplotlib")
    rep = write_report(out, tmp_path / "report")
    assert any(p.name == "run_curves.png" for p in rep["plots"])


def test_heldout_resume_byte_exact_and_training_untouched(tiny, heldout, tmp_path):  # noqa: F811
    """8 iterations straight == 4 (checkpointed after the evaluation at 3) + rerun to 8:
    identical metrics.jsonl, eval_samples.jsonl and best.json (best-so-far restored from the
    checkpoint); the same run without evaluation logs the same training metrics, so the
    evaluation draws nothing from the training RNG."""
    extra = ("train.eval_every=3", "train.best_metric=eval/reward", "train.iterations=8",
             "train.save_every=0", "train.eval_temperature=0.7")
    straight = tmp_path / "a"
    run(_eval_cfg(tiny, heldout, straight, *extra))
    resumed = tmp_path / "b"
    run(_eval_cfg(tiny, heldout, resumed, *extra, "train.iterations=4"))
    run(_eval_cfg(tiny, heldout, resumed, *extra))
    for name in ("metrics.jsonl", "eval_samples.jsonl", "best/best.json"):
        assert (resumed / name).read_text() == (straight / name).read_text(), name
    assert [r["step"] for r in _evals(records(straight))] == [3, 6]
    plain = tmp_path / "c"
    run(config(tiny, plain, "train.iterations=8", "train.save_every=0", "train.sample_every=0"))
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows]
    assert strip(records(straight)) == records(plain)


def test_heldout_config_errors(tiny, heldout, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="train.eval_every needs data.eval_prompts"):
        config(tiny, tmp_path, "train.eval_every=2")
    with pytest.raises(ConfigError, match="early_stop_patience needs train.best_metric"):
        _eval_cfg(tiny, heldout, tmp_path, "train.early_stop_patience=2")
    with pytest.raises(ConfigError, match="train.best_mode 'up'"):
        _eval_cfg(tiny, heldout, tmp_path, "train.best_metric=eval/reward", "train.best_mode=up")
