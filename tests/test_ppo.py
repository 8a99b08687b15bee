"""PPO / GRPO on a tiny random Llama: sampler vs trainer log-probs, learning a programmatic
reward under a KL ceiling, exact resume, bad inputs, the roles (LoRA reference, reward
model, separate critic), the run report.

Compile time dominates: every run with the PPO config below shares one set of compiled
programs (`programs.compiled` caches them per process), so most tests cost about a second.
"""

import json
import struct
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign.checkpoint import TrainCheckpoints
from jaxalign.config import ConfigError, apply_overrides, from_dict
from jaxalign.data.sources import DataError
from jaxalign.train.shell import NonFiniteLossError
from jaxalign.train.preempt import Preempted
from jaxalign.train.rl import prompts as RP, rollout as R
from jaxalign.train.rl.config import RLConfig
from jaxalign.train.rl.driver import MonitorStop, run_rl
from jaxalign.train.rl.rewards import RewardFunctionError, RewardModelError
from conftest import KL_CEILING, KL_TARGET, PPO_ITERATIONS as ITERATIONS, ppo_config as config, \
    read_metrics, run_rl_one_device as run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(ppo_tiny):
    return ppo_tiny


def records(run_dir) -> list[dict]:
    return read_metrics(Path(run_dir))


def saved_steps(run_dir) -> list[int]:
    ckpts = TrainCheckpoints(run_dir)
    steps = list(ckpts.manager.all_steps())
    ckpts.close()
    return steps


def _learned(rows, gain):
    first = np.mean([r["reward_mean"] for r in rows[:4]])
    last = np.mean([r["reward_mean"] for r in rows[-4:]])
    assert last >= first + gain, (first, last, [round(r["reward_mean"], 3) for r in rows])
    assert max(r["kl"] for r in rows) <= KL_CEILING  # also enforced by the monitor (stop)
    return first, last


@pytest.fixture(scope="module")
def ppo_run(tiny):
    out = tiny["root"] / "ppo"
    run(config(tiny, out))
    return out


def test_sampler_logprobs_equal_training_logprobs(tiny):
    """The sampler's log-probs (KV cache, temperature 0.7, top-p 0.9, left padding) equal the
    training forward's, fp32, within 1e-5: the chunked head the loss uses and full logits."""
    from jaxalign.convert import hf
    from jaxalign.models import functional
    from jaxalign.tokenizer import load_tokenizer

    cfg, params, _ = hf.load(tiny["model_dir"], scan_layers=False)
    tok = load_tokenizer(tiny["model_dir"])
    ids = [tok(t).input_ids for t in ("What is 2 plus 3?", "red", "write a list of three colors")]
    assert len({len(x) for x in ids}) == 3
    prompts = RP.Prompts("inline", [""] * 3, ids)
    tokens_BP, mask_BP = RP.stack_prompts(prompts, [0, 1, 2, 1], tok.pad_token_id, 16)
    T = 0.7
    models = R.Models(policy=cfg, ref="copy", value="none")
    sampling = R.Sampling(max_new_tokens=8, temperature=T, top_p=0.9, top_k=0,
                          eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)

    @jax.jit
    def go(p, tokens, mask, key):
        out = R.rollout(models, sampling, {"policy": p}, {"policy": {}}, {"ref": p}, tokens, mask, key)
        logits = functional.apply(cfg, p, out["tokens_BT"], positions_BT=out["positions_BT"],
                                  segment_ids_BT=out["segment_ids_BT"])[0]
        return out, jax.nn.log_softmax(logits / T, axis=-1)

    out, full_logp = jax.device_get(go(params, tokens_BP, mask_BP, jax.random.PRNGKey(3)))
    mask = out["mask_BN"].astype(bool)
    assert mask.sum() >= 16
    sampler, trained = out["sampler_logp_BN"], out["old_logp_BN"]
    np.testing.assert_array_less(np.abs(sampler - trained)[mask], 1e-5)
    P, N = tokens_BP.shape[1], mask.shape[1]
    picked = np.take_along_axis(full_logp[:, P - 1:P - 1 + N], out["response_BN"][..., None], -1)[..., 0]
    np.testing.assert_array_less(np.abs(sampler - picked)[mask], 1e-5)
    # The reference is a copy of the same params here: zero KL.
    np.testing.assert_array_less(np.abs(out["ref_logp_BN"] - trained)[mask], 1e-6)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_ppo_learns_reward_under_kl_ceiling(ppo_run):
    rows = records(ppo_run)
    assert [r["step"] for r in rows] == list(range(1, ITERATIONS + 1))
    first, last = _learned(rows, gain=0.15)
    print(f"PPO reward {first:.3f} -> {last:.3f}, KL max {max(r['kl'] for r in rows):.2f}")
    assert max(r["logprob_gap"] for r in rows) <= 1e-5
    assert rows[0]["kl"] == 0.0                                 # the reference is a copy
    for key in ("reward_std", "entropy", "clipfrac", "approx_kl", "value_loss",
                "explained_variance", "response_length", "eos_rate", "kl_coef", "epochs"):
        assert key in rows[-1], key
    from jaxalign.train.recipes import RECIPES
    assert set(RECIPES["ppo"].progress) <= set(rows[-1])  # what the progress line shows exists
    assert len({r["kl_coef"] for r in rows}) > 1                 # the adaptive controller moves
    samples = [json.loads(l) for l in (ppo_run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [4, 4, 8, 8, 12, 12, 16, 16]
    assert {"prompt", "completion", "reward", "length", "eos"} <= set(samples[0])
    memory = json.loads((ppo_run / "memory.json").read_text())
    assert set(memory["programs"]) == {"rollout", "advantages", "train_step"}
    assert memory["programs"]["train_step"]["temp"] > 0
    b = memory["params_bytes"]
    assert b["reference"] == b["policy_trainable"] > 0 and b["value"] == 64 * 4


@pytest.mark.slow  # trains and resumes whole runs
def test_grpo_learns_reward_under_kl_ceiling_and_resumes_exactly(tiny, tmp_path):
    args = ("algorithm=grpo", "rollout.batch_size=4", "rollout.num_generations=4",
            "ppo.epochs=2", "grpo.beta=0.04", "train.sample_every=0")
    out = tiny["root"] / "grpo"
    run(config(tiny, out, *args))
    rows = records(out)
    first, last = _learned(rows, gain=0.15)
    print(f"GRPO reward {first:.3f} -> {last:.3f}, KL max {max(r['kl'] for r in rows):.2f}")
    assert "value_loss" not in rows[-1] and rows[-1]["kl_loss"] > 0
    assert rows[-1]["kl_coef"] == 0.04
    resumed = tmp_path / "r"   # stopped after 3 iterations, then the same command again
    run(config(tiny, resumed, *args, "train.iterations=3"))
    run(config(tiny, resumed, *args))
    assert (resumed / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_rloo_learns_resumes_exactly_and_passes_columns(tiny, tmp_path):
    """RLOO, one row of the objectives table, raises the reward on the shared driver (no
    value model, KL in the reward); a run stopped after 3 iterations and rerun writes the
    same metrics as the straight run; a keyword reward function gets the `answer` column of
    each completion's prompt row (and the other columns, here `messages`)."""
    mod = tiny["rewards"]
    mod.SEEN.clear()
    args = ("algorithm=rloo", "rollout.batch_size=4", "rollout.num_generations=4",
            "ppo.epochs=2", "ppo.kl_coef=0.03", "ppo.kl_target=null", "train.sample_every=0",
            "reward.weights=[1.0,0.0]",
            "reward.functions=[jaxalign.rewards:digits,ppo_test_rewards:answer_seen]")
    out = tiny["root"] / "rloo"
    run(config(tiny, out, *args))
    rows = records(out)
    first, last = _learned(rows, gain=0.15)
    print(f"RLOO reward {first:.3f} -> {last:.3f}, KL max {max(r['kl'] for r in rows):.2f}")
    assert "value_loss" not in rows[-1] and "kl_loss" not in rows[-1]
    assert "explained_variance" not in rows[-1]
    assert {r["kl_coef"] for r in rows} == {0.03}    # ppo.kl_coef: the KL is in the reward
    assert len(mod.SEEN) == ITERATIONS
    for prompts, answers, others in mod.SEEN:
        assert others == ["messages"] and len(answers) == 16
        for p, a in zip(prompts, answers):
            x, y = (int(w) for w in p.rstrip("?").split()[2::2])
            assert int(a) == x + y
    resumed = tmp_path / "r"
    run(config(tiny, resumed, *args, "train.iterations=3"))
    run(config(tiny, resumed, *args))
    assert (resumed / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()


def test_reward_functions_take_dataset_columns(tiny, tmp_path):
    """A prompt file with an `answer` column: the verifiable reward `exact_answer` (keyword
    form) scores each completion against its row's answer; the positional form still works."""
    from jaxalign.rewards import digits
    from jaxalign.tokenizer import load_tokenizer
    from jaxalign.train.rl.config import PromptDataConfig, RewardConfig
    from jaxalign.train.rl.rewards import Rewarder, call_function

    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": "What is 2 plus 3?", "answer": "5", "level": 1},
            {"prompt": "What is 10 plus 7?", "answer": "#### 17", "level": 2},
            {"prompt": "Capital of France?", "answer": "Paris"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = RP.read_prompts(PromptDataConfig(prompts=str(path)),
                              load_tokenizer(tiny["model_dir"]))
    assert prompts.columns == {"answer": ["5", "#### 17", "Paris"], "level": [1, 2, None]}
    idx = [0, 0, 1, 1, 2, 2]
    completions = ["The answer is 5.", "6", "It is 1 7", "17,000", " paris ", "Lyon"]
    texts = [prompts.texts[i] for i in idx]
    rewarder = Rewarder(RewardConfig(functions=("jaxalign.rewards:exact_answer",
                                                "jaxalign.rewards:digits")))
    total, parts = rewarder.raw(texts, completions, np.zeros(6), np.ones(6, bool),
                                prompts.columns_of(idx))
    exact = np.array([1, 0, 0, 0, 1, 0], np.float64)
    np.testing.assert_allclose(total, exact + np.array(digits(texts, completions)))
    assert parts["reward/exact_answer"] == pytest.approx(exact.mean())
    positional = call_function("lambda", lambda p, c: [len(x) for x in c], texts, completions,
                               prompts.columns_of(idx))
    np.testing.assert_array_equal(positional, [len(c) for c in completions])
    with pytest.raises(RewardFunctionError, match=r"raised TypeError: .*'answer'"):
        call_function("needs_answer", lambda prompts, completions, answer: [0.0] * 6,
                      texts, completions, {})


def test_exact_resume(tiny, ppo_run, tmp_path):
    """16 iterations straight == stopped (SIGTERM during iteration 6's rollout: abandoned,
    iteration 5 saved) + a stray record past the checkpoint + rerun: identical metrics.jsonl
    and samples.jsonl (rollout RNG, prompt position, adaptive KL coefficient all restored)."""
    mod = tiny["rewards"]
    mod.CALLS["n"], mod.STOP_AT["n"] = 0, 6
    cfg = config(tiny, tmp_path / "r", "reward.functions=[ppo_test_rewards:digits]")
    with pytest.raises(Preempted, match="rollout of iteration 6; iteration 5 is checkpointed"):
        run(cfg)
    assert TrainCheckpoints(tmp_path / "r").latest_step() == 5
    assert [r["step"] for r in records(tmp_path / "r")] == [1, 2, 3, 4, 5]
    with open(tmp_path / "r" / "metrics.jsonl", "a") as f:  # as if killed after logging 6
        f.write(json.dumps({"step": 6, "reward_mean": 123.0}) + "\n")
    mod.STOP_AT["n"] = None
    run(cfg)
    for name in ("metrics.jsonl", "samples.jsonl"):
        assert (tmp_path / "r" / name).read_text() == (ppo_run / name).read_text(), name


@pytest.mark.parametrize("fn, message", [
    ("raises", r"reward function ppo_test_rewards:raises raised ValueError: boom"),
    ("nan", r"reward function ppo_test_rewards:nan returned nan for completion 3"),
    ("wrong_count", r"reward function ppo_test_rewards:wrong_count returned 15 value\(s\) "
                    r"for 16 completion\(s\)"),
])
def test_bad_reward_function_keeps_last_iteration(tiny, tmp_path, fn, message):
    tiny["rewards"].CALLS["n"] = 0
    cfg = config(tiny, tmp_path, f"reward.functions=[ppo_test_rewards:{fn}]")
    with pytest.raises(RewardFunctionError, match=rf"iteration 2: {message}.*checkpoint of "
                                                  r"iteration 1 .* is intact"):
        run(cfg)
    # Iteration 1 is checkpointed (saved on the error, save_every is 4); nothing of 2 is.
    assert saved_steps(tmp_path) == [1]
    assert [r["step"] for r in records(tmp_path)] == [1]


def test_nan_loss_stops_with_last_checkpoint(tiny, tmp_path):
    tiny["rewards"].CALLS["n"] = 0
    cfg = config(tiny, tmp_path, "reward.functions=[ppo_test_rewards:huge]", "train.save_every=1")
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: non-finite loss.*last good "
                                                 r"checkpoint \(iteration 1\)"):
        run(cfg)
    assert saved_steps(tmp_path) == [1]


def test_approx_kl_early_stop(tiny, ppo_run, tmp_path):
    """ppo.max_approx_kl ends a rollout's epochs once an epoch's mean approx KL exceeds it;
    unset, every iteration runs all ppo.epochs (the shared run)."""
    assert all(r["epochs"] == 4.0 for r in records(ppo_run))
    run(config(tiny, tmp_path, "ppo.max_approx_kl=1e-12", "train.iterations=2"))
    rows = records(tmp_path)
    assert [r["epochs"] for r in rows] == [1.0, 1.0]
    assert all(r["approx_kl"] > 1e-12 for r in rows)


def test_cpu_update_pauses_after_each_minibatch_step(tiny, tmp_path, monkeypatch):
    """On the CPU, each update minibatch step whose program's temporaries are large (here: any
    size) is followed by `runtime.SETTLE_S` before the next dispatch (XLA frees a step's
    temporaries just after its outputs are ready)."""
    import time
    from jaxalign import runtime
    from jaxalign.train.rl import driver
    pauses = []

    class Recorded:   # the driver's `time`, its sleeps recorded (this module's only)
        def __getattr__(self, name):
            return getattr(time, name)

        def sleep(self, seconds):
            pauses.append(seconds)
            time.sleep(seconds)
    monkeypatch.setattr(runtime, "SETTLE_MIN_BYTES", 0)
    monkeypatch.setattr(driver, "time", Recorded())
    cfg = config(tiny, tmp_path, "train.iterations=1")
    run(cfg)
    steps = int(records(tmp_path)[0]["epochs"]) * cfg.ppo.minibatches
    assert steps > 1 and pauses.count(runtime.SETTLE_S) == steps, (pauses, steps)


def test_reward_sources_weighted_and_eos_penalty():
    """score = sum of weight x source (the model first), minus the missing-EOS penalty; a
    weight list of the wrong length is refused by name."""
    from jaxalign.rewards import brevity, digits
    from jaxalign.train.rl.config import RewardConfig
    from jaxalign.train.rl.rewards import Rewarder
    prompts = ["What is 2 plus 3?"] * 3
    completions = ["5", "The answer is 5, I think, or maybe 6", "no digits here"]
    eos = np.array([True, False, True])
    model_scores = np.array([0.5, -1.0, 2.0])
    cfg = RewardConfig(model="unused-dir", functions=("jaxalign.rewards:digits", "jaxalign.rewards:brevity"),
                       weights=(0.5, 2.0, -1.0), missing_eos_penalty=0.25)
    total, parts = Rewarder(cfg).raw(prompts, completions, model_scores, eos)
    expected = (0.5 * model_scores + 2.0 * np.array(digits(prompts, completions))
                - np.array(brevity(prompts, completions)) - 0.25 * ~eos)
    np.testing.assert_allclose(total, expected, rtol=1e-12)
    assert parts["reward/model"] == pytest.approx(model_scores.mean())
    assert parts["reward/digits"] == pytest.approx(np.mean(digits(prompts, completions)))
    assert len(set(np.round(expected, 6))) == 3  # the sources really differ per completion
    with pytest.raises(ConfigError, match=r"reward.weights has 2 entries for 3 reward source"):
        RewardConfig(model="m", functions=("a:b", "c:d"), weights=(1.0, 2.0))


def test_monitor_stop(tiny, tmp_path):
    cfg = config(tiny, tmp_path, "monitor.entropy_floor=100.0")
    with pytest.raises(MonitorStop, match=r"iteration 1: entropy .* < monitor.entropy_floor=100"):
        run(cfg)
    assert TrainCheckpoints(tmp_path).latest_step() == 1


def test_wrong_kind_of_reward_model(tiny, tmp_path):
    cfg = config(tiny, tmp_path, f"reward.model={tiny['model_dir']}")
    with pytest.raises(RewardModelError, match=r"wrong kind of model: a causal LM"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_prompt_sets(tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"{empty}: file has no rows"):
        run(config(tiny, tmp_path / "a", f"data.prompts={empty}"))
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "hi"}\n')
    with pytest.raises(DataError, match=rf"{no_field}: row 0 \(line 1\): no 'prompt' or 'messages'"):
        run(config(tiny, tmp_path / "b", f"data.prompts={no_field}"))
    with pytest.raises(DataError, match=r"no usable prompts .* longer than data.max_prompt_len=4"):
        run(config(tiny, tmp_path / "c", "data.max_prompt_len=4"))
    with pytest.raises(ConfigError, match="grpo needs rollout.num_generations >= 2"):
        config(tiny, tmp_path, "algorithm=grpo")
    with pytest.raises(ConfigError, match="reward.functions: 'nocolon' is not of the form"):
        config(tiny, tmp_path, "reward.functions=[nocolon]")


@pytest.mark.slow  # trains and resumes whole runs
def test_lora_reward_model_and_separate_critic(tiny, tmp_path):
    """LoRA policy (reference = adapters off: no copy, KL exactly 0 before any update), a
    reward model directory scoring the last token, a separate critic initialised from it."""
    from jaxalign import checkpoint
    from jaxalign.convert import hf

    cfg, params, hf_config, _ = checkpoint.load_model(tiny["model_dir"], num_labels=1, seed=5)
    rm_dir = hf.save(tmp_path / "rm", cfg, params, hf_config=hf_config, source_dir=tiny["model_dir"])
    out = tmp_path / "run"
    run(config(tiny, out, f"reward.model={rm_dir}", "reward.functions=[]", "lora.rank=4",
               "ppo.value_model=separate", "ppo.critic_init=reward", "train.iterations=2",
               "ppo.epochs=1", "monitor.kl_ceiling=null"))
    rows = records(out)
    assert rows[0]["kl"] == 0.0 and rows[0]["reward_mean"] == pytest.approx(rows[0]["reward/model"])
    assert rows[0]["reward_std"] > 0 and np.isfinite(rows[1]["value_loss"])
    b = json.loads((out / "memory.json").read_text())["params_bytes"]
    assert b["reference"] == 0 and b["reward_model"] > 0
    assert 0 < b["policy_trainable"] < b["policy_frozen"]      # adapters only
    assert b["value"] == b["policy_trainable"] + 64 * 4           # adapters + score; trunk shared
    # The run dir loads back as a model (run.json says ppo): the trained LoRA policy.
    from jaxalign.models import functional
    mcfg, mparams, _, _ = checkpoint.load_model(out)
    assert mcfg.lora_rank == 4 and mcfg.num_labels == 0
    x = np.arange(3, 19, dtype=np.int32)[None]
    on, off = (np.asarray(functional.apply(mcfg, mparams, x, use_lora=u)[0]) for u in (True, False))
    assert np.abs(on - off).max() > 1e-4                          # the adapters trained


def test_ppo_run_loads_policy_only(ppo_run, monkeypatch):
    """`load_model(run_dir)` reads run.json and restores only the policy subtree: no role
    builder, reward model, critic or value head is touched (each raises here), and the
    params equal the checkpoint's state.params['policy'] read whole by orbax."""
    import orbax.checkpoint as ocp
    from jaxalign import checkpoint
    from jaxalign.train import setup
    from jaxalign.train.rl import roles, rewards

    def boom(*a, **k):
        raise AssertionError("loading a run dir built a training role")
    for mod, name in ((roles, "build_roles"), (roles, "_critic"), (roles, "_value_head"),
                      (rewards, "load_frozen_reward_model"), (setup, "load_policy")):
        monkeypatch.setattr(mod, name, boom)
    cfg, params, _, tok_dir = checkpoint.load_model(ppo_run)
    assert cfg.num_labels == 0 and cfg.lora_rank == 0 and "score" not in params
    step = TrainCheckpoints(ppo_run).latest_step()
    with ocp.PyTreeCheckpointer() as reader:
        saved = reader.restore(ppo_run / "checkpoints" / str(step) / "state")
    assert set(saved["params"]) == {"policy", "value_head"}
    assert jax.tree.structure(params) == jax.tree.structure(saved["params"]["policy"])
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved["params"]["policy"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (Path(tok_dir) / "tokenizer.json").exists()


def test_ppo_report(ppo_run, tmp_path, capsys, monkeypatch):
    """`jaxalign report` on the PPO run: report.md, its plot (a real PNG with the reward, KL and
    entropy panels), the memory report, samples and the summary table on stdout."""
    from jaxalign import cli
    from jaxalign.report import grouped, write_report
    assert cli.main(["report", str(ppo_run), "--out", str(tmp_path)]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("| stage | algorithm | steps / rows |") and "| ppo |" in summary
    md = (tmp_path / "report.md").read_text()
    png = tmp_path / f"{ppo_run.name}_curves.png"
    assert f"]({png.name})" in md
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 200
    groups = grouped(records(ppo_run))
    assert {"reward", "KL", "entropy", "loss"} <= set(groups), groups
    assert "reward_mean" in groups["reward"] and "kl" in groups["KL"]
    assert "Memory report" in md and "peak_estimate" in md
    assert "Samples" in md and "completion" in md
    last = records(ppo_run)[-1]
    assert f"| reward_mean | {last['reward_mean']:.4g} |" in md
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the extra missing: one line naming it
    assert cli.main(["report", str(ppo_run), "--out", str(tmp_path / "x")]) == 1
    assert "pip install 'jaxalign[report]'" in capsys.readouterr().err


def test_cli_ppo(tiny, tmp_path, capsys):
    """`jaxalign ppo`: a usage error exits 2; configs/tiny_ppo.yaml parses, and a run error is
    one line and exit 1 (here: a causal LM given as the reward model)."""
    from jaxalign import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["ppo"])
    assert e.value.code == 2
    assert cli.main(["ppo", str(ROOT / "configs" / "tiny_ppo.yaml"), f"out_dir={tmp_path}",
                     f"model.path={tiny['model_dir']}", f"data.prompts={tiny['prompts']}",
                     f"reward.model={tiny['model_dir']}"]) == 1
