"""Reward functions written for TRL's GRPOTrainer run unchanged: TRL's bundled ones on
conversational data give what calling them directly gives; TRL's calling convention
(message lists, completion_ids, the dataset's columns, trainer_state, None as "not
applicable", async functions) reaches a function inside a real RL run."""

import json
import sys

import jax
import numpy as np
import pytest

from jaxalign.config import ConfigError, apply_overrides, from_dict
from jaxalign.tokenizer import load_tokenizer
from jaxalign.train.rl import prompts as RP
from jaxalign.train.rl.config import PromptDataConfig, RewardConfig, RLConfig
from jaxalign.train.rl.driver import run_rl
from jaxalign.train.rl.rewards import (Rewarder, TRLInputs, TrainerState, call_function,
                                       fill_unscored, is_trl_style)

TRL_MODULE = '''
SEEN = []

def shaped(prompts, completions, completion_ids, trainer_state, solution, **kwargs):
    """TRL-shaped: reads message lists, ids and the step; None where no solution (n/a)."""
    SEEN.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                     step=trainer_state.global_step, max_steps=trainer_state.max_steps,
                     solution=solution, extra=sorted(kwargs)))
    kwargs["log_metric"]("calls", len(SEEN))
    return [None if s == "n/a" else float(len(ids) % 2) for ids, s in zip(completion_ids, solution)]

async def judge(prompts, completions, **kwargs):
    return [float(len(c[0]["content"]) > 3) for c in completions]
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("trl_rewards")
    model_dir = make_tiny_model(root / "model")
    path = root / "conv.jsonl"
    rows = []
    for i in range(16):  # TRL's conversational prompt format: `prompt` is a message list
        a, b = i % 4 + 1, i // 4 + 2
        rows.append({"prompt": [{"role": "system", "content": "Answer in \\boxed{}."},
                                {"role": "user", "content": f"What is {a} plus {b}?"}],
                     "solution": "n/a" if i % 5 == 4 else f"${a + b}$"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "trl_shaped_rewards.py").write_text(TRL_MODULE)
    sys.path.insert(0, str(root))
    import trl_shaped_rewards
    return dict(root=root, model_dir=model_dir, prompts=path, module=trl_shaped_rewards)


COMPLETIONS = ["<think>\n2 and 3\n</think>\nThe answer is $\\boxed{5}$",
               "The answer is \\boxed{5}",
               "<think>so</think> it is \\boxed{4}",
               "<think>a<think>b</think> \\boxed{7}"]


def _read(env):
    return RP.read_prompts(PromptDataConfig(prompts=str(env["prompts"]), chat=True),
                           load_tokenizer(env["model_dir"]))


def test_trl_bundled_rewards_unchanged_on_conversational_data(env):
    """think_format_reward (and accuracy_reward where math-verify is installed), named by
    'module:function' exactly as in TRL, score our conversational rollout rows as calling
    them directly with TRL's inputs does: each completion a one-message assistant list."""
    from trl.rewards import think_format_reward

    prompts = _read(env)
    assert prompts.trl[0] == [{"role": "system", "content": "Answer in \\boxed{}."},
                              {"role": "user", "content": "What is 1 plus 2?"}]
    idx = [0, 1, 2, 3]
    conv = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    trl = TRLInputs([prompts.trl[i] for i in idx], [[1, 2]] * 4)
    got = call_function("trl.rewards:think_format_reward", think_format_reward,
                        [prompts.texts[i] for i in idx], COMPLETIONS, prompts.columns_of(idx),
                        trl=trl)
    want = think_format_reward(conv)
    np.testing.assert_array_equal(got, want)
    assert list(got) == [1.0, 0.0, 1.0, 0.0]        # the cases differ: the test can fail
    assert is_trl_style(think_format_reward)         # detected: it lives in a trl module
    # Forced to jaxalign's convention, the same function sees strings and fails by name.
    with pytest.raises(Exception, match="think_format_reward raised"):
        call_function("trl.rewards:think_format_reward", think_format_reward,
                      [prompts.texts[i] for i in idx], COMPLETIONS, prompts.columns_of(idx),
                      convention="jaxalign", trl=trl)


def test_trl_accuracy_reward_unchanged(env):
    """trl.rewards.accuracy_reward (it needs the math-verify package) through the Rewarder:
    its None for an unparseable gold answer is NaN, the rest as calling it directly."""
    pytest.importorskip("math_verify", reason="trl.rewards.accuracy_reward needs math-verify")
    from trl.rewards import accuracy_reward
    prompts = _read(env)
    idx = [0, 1, 2, 4]
    conv = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]
    trl = TRLInputs([prompts.trl[i] for i in idx], [[1, 2]] * 4)
    rewarder = Rewarder(RewardConfig(functions=("trl.rewards:accuracy_reward",
                                                "trl.rewards:think_format_reward")))
    cols = prompts.columns_of(idx)
    total, parts = rewarder.raw_rows([prompts.texts[i] for i in idx], COMPLETIONS, np.zeros(4),
                                     np.ones(4, bool), cols, trl=trl)
    direct = accuracy_reward(conv, cols["solution"])
    np.testing.assert_array_equal(parts["reward/accuracy_reward"],
                                  [np.nan if v is None else v for v in direct])


def test_none_is_skipped_in_the_weighted_sum_as_trl(env):
    """A source's None is NaN, left out of the weighted sum (TRL's nansum over
    rewards_per_func x reward_weights); a row every source skips takes its group's mean."""
    import torch

    prompts = _read(env)
    idx = list(range(8))
    comps = ["ab", "abcd", "a", "abcdef", "xyz1", "q", "hello", "hi"]
    ids = [[7] * (i + 1) for i in range(8)]
    cfg = RewardConfig(model="unused", functions=("trl_shaped_rewards:shaped",
                                                  "trl_shaped_rewards:judge"),
                       weights=(0.5, 2.0, -1.0), convention="trl")
    model = np.linspace(-1, 1, 8)
    rewarder = Rewarder(cfg)
    total, parts = rewarder.raw_rows([prompts.texts[i] for i in idx], comps, model,
                                     np.ones(8, bool), prompts.columns_of(idx),
                                     trl=TRLInputs([prompts.trl[i] for i in idx], ids,
                                                   TrainerState(3, 10)))
    seen = env["module"].SEEN[-1]
    assert seen["prompts"][0][1]["content"] == "What is 1 plus 2?"
    assert seen["completions"][1] == [{"role": "assistant", "content": "abcd"}]
    assert seen["completion_ids"] == ids and (seen["step"], seen["max_steps"]) == (3, 10)
    assert {"log_extra", "log_metric"} <= set(seen["extra"])
    assert np.isnan(parts["reward/shaped"][4])       # row 4 has no solution: None
    # TRL's aggregation, computed with TRL's own operations on the same per-source rewards.
    per_func = torch.tensor(np.stack([model, parts["reward/shaped"], parts["reward/judge"]], 1),
                            dtype=torch.float64)
    trl_total = (per_func * torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)).nansum(dim=1)
    np.testing.assert_allclose(total, trl_total.numpy(), rtol=1e-12)
    # Only functions, every one skipping row 4: that row is unscored, then takes its group's mean.
    only = Rewarder(RewardConfig(functions=("trl_shaped_rewards:shaped",)))
    total, _ = only.raw_rows([prompts.texts[i] for i in idx], comps, model, np.ones(8, bool),
                             prompts.columns_of(idx),
                             trl=TRLInputs([prompts.trl[i] for i in idx], ids))
    assert np.isnan(total[4]) and np.isfinite(np.delete(total, 4)).all()
    filled = fill_unscored(total, group=4)
    assert filled[4] == pytest.approx(np.mean(total[5:8]))
    with pytest.raises(ConfigError, match="reward.convention 'torch'"):
        RewardConfig(functions=("a:b",), convention="torch")


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_trl_shaped_function_inside_a_grpo_run(env, tmp_path):
    """Two GRPO iterations with a TRL-shaped reward and an async one, and a held-out
    evaluation after the second: the function gets the message-list prompts of the rows
    sampled, completions as assistant messages whose text is the decoded completion_ids, the
    solution column, and the step; the run logs both means, in training and in eval/."""
    tok = load_tokenizer(env["model_dir"])
    heldout = tmp_path.parent / f"{tmp_path.name}_heldout.jsonl"
    heldout.write_text("".join(l + "\n" for l in env["prompts"].read_text().splitlines()[-4:]))
    raw = {"out_dir": str(tmp_path), "algorithm": "grpo",
           "model": {"path": str(env["model_dir"]), "scan_layers": False},
           "data": {"prompts": str(env["prompts"]), "chat": True, "max_prompt_len": 64,
                    "eval_prompts": str(heldout)},
           "rollout": {"batch_size": 4, "num_generations": 2, "max_new_tokens": 6},
           "reward": {"functions": ["trl_shaped_rewards:shaped", "trl_shaped_rewards:judge"],
                      "convention": "trl"},
           "ppo": {"epochs": 1, "minibatches": 1},
           "train": {"iterations": 2, "sample_every": 0, "tensorboard": False,
                     "progress": False, "eval_every": 2},
           "optim": {"lr": 1e-3, "schedule": "constant"},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    seen = env["module"].SEEN
    seen.clear()
    run_rl(from_dict(RLConfig, apply_overrides(raw, [])), devices=jax.devices()[:1])
    assert [s["step"] for s in seen] == [0, 1, 2] and seen[0]["max_steps"] == 2  # 2: eval
    for s in seen:
        assert len(s["completions"]) == 8
        for p, c, ids in zip(s["prompts"], s["completions"], s["completion_ids"]):
            assert p[0]["role"] == "system" and p[1]["role"] == "user"
            assert c == [{"role": "assistant",
                          "content": tok.decode(ids, skip_special_tokens=True)}]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["reward_mean"]) for r in rows)
    assert {"reward/shaped", "reward/judge"} <= set(rows[0])
    assert "eval/reward" not in rows[0]
    assert {"eval/reward", "eval/reward/shaped", "eval/reward/judge"} <= set(rows[1])
    written = (tmp_path / "eval_samples.jsonl").read_text().splitlines()
    assert [json.loads(l)["prompt"] for l in written] == [
        f"What is {i % 4 + 1} plus {i // 4 + 2}?" for i in range(12, 16)]
