"""A reward model with another tokenizer than the policy's (TRL allows it): the decoded
completions are re-encoded with the reward model's own tokenizer and chat template.

Policy: the tiny random Llama with its tiny BPE tokenizer (384 tokens). Reward model: a tiny
random Qwen2ForSequenceClassification built by transformers, with SmolLM2's tokenizer (49,152
tokens, ChatML template with a default system turn). The reference is transformers' own
forward of that model on the reward model's own tokenization of the conversation
(`apply_chat_template` with the completion as the assistant turn)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxalign.config import apply_overrides, from_dict
from jaxalign.tokenizer import load_tokenizer
from jaxalign.train.rl.config import RLConfig, RewardConfig
from jaxalign.train.rl.driver import run_rl
from jaxalign.train.rl.rewards import Rewarder, TRLInputs, load_frozen_reward_model

pytestmark = pytest.mark.slow  # whole GRPO and eval runs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, smollm2_dir):
    SMOL = Path(smollm2_dir)   # its 49k-token tokenizer: another vocabulary than the policy's
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForSequenceClassification
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("rm_tok")
    policy = make_tiny_model(root / "policy")
    rm_tok = AutoTokenizer.from_pretrained(SMOL)
    torch.manual_seed(0)
    rm = Qwen2ForSequenceClassification(Qwen2Config(
        vocab_size=len(rm_tok), hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, num_labels=1, bos_token_id=rm_tok.bos_token_id,
        eos_token_id=rm_tok.eos_token_id, pad_token_id=rm_tok.pad_token_id)).eval()
    rm_dir = root / "rm"
    rm.save_pretrained(rm_dir)
    for f in TOKENIZER_FILES:
        if (SMOL / f).exists():
            shutil.copy(SMOL / f, rm_dir / f)
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(16):
            a, b = i % 4 + 2, i // 4 + 3
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}]})
                    + "\n")
    return dict(root=root, policy=policy, rm=rm, rm_dir=rm_dir, rm_tok=rm_tok, prompts=prompts)


def reference(setup, prompt_msgs, completion: str) -> float:
    """transformers' score of the conversation in the reward model's own tokenization."""
    import torch
    tok = setup["rm_tok"]
    text = tok.apply_chat_template(list(prompt_msgs) + [{"role": "assistant", "content": completion}],
                                   tokenize=False)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        return float(setup["rm"](torch.tensor([ids])).logits[0, 0])


def test_the_tokenizers_really_differ(setup):
    a, b = load_tokenizer(setup["policy"]), setup["rm_tok"]
    assert len(a) < 1000 < len(b)
    text = "What is 3 plus 4? The answer is 7."
    assert a(text)["input_ids"] != b(text)["input_ids"]


def test_rl_path_scores_as_the_reward_model_does_on_its_own_tokens(setup):
    policy_tok = load_tokenizer(setup["policy"])
    cfg, params, judge = load_frozen_reward_model(str(setup["rm_dir"]), None, policy_tok)
    assert judge is not None and cfg.num_labels == 1
    prompts = [[{"role": "user", "content": "What is 2 plus 3?"}],
               [{"role": "user", "content": "What is 9 plus 1?"}],
               [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]]
    # Completions as the policy produces them: its ids, decoded without special tokens.
    completions = [policy_tok.decode(policy_tok("The answer is 5.")["input_ids"]), "10", ""]
    want = np.array([reference(setup, p, c) for p, c in zip(prompts, completions)])
    assert np.ptp(want) > 1e-3                                   # the scores tell rows apart
    np.testing.assert_allclose(judge.score(prompts, completions), want, atol=1e-4, rtol=1e-4)
    # Through the Rewarder, as the RL driver calls it (the rollout's in-jit score is unused).
    rewarder = Rewarder(RewardConfig(model=str(setup["rm_dir"]), functions=[]))
    rewarder.judge = judge
    raw, parts = rewarder.raw_rows(["ignored"] * 3, completions, np.zeros(3), np.ones(3, bool),
                                   trl=TRLInputs(prompts, [[0]] * 3))
    np.testing.assert_allclose(raw, want, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(parts["reward/model"], want, atol=1e-4, rtol=1e-4)


def test_grpo_run_with_a_reward_model_of_another_tokenizer(setup, caplog):
    out = setup["root"] / "grpo"
    raw = {"out_dir": str(out), "algorithm": "grpo",
           "model": {"path": str(setup["policy"]), "scan_layers": False},
           "data": {"prompts": str(setup["prompts"]), "chat": True, "max_prompt_len": 64},
           "rollout": {"batch_size": 4, "num_generations": 2, "max_new_tokens": 8,
                       "temperature": 1.0},
           "reward": {"model": str(setup["rm_dir"]), "functions": []},
           "train": {"iterations": 2, "save_every": 2, "sample_every": 1, "num_samples": 8,
                     "tensorboard": False, "progress": False},
           "optim": {"lr": 1e-3, "schedule": "constant"},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    with caplog.at_level("INFO"):
        run_rl(from_dict(RLConfig, apply_overrides(raw, [])), devices=jax.devices()[:1])
    assert any("tokenizer differs from the policy's; completions are decoded and re-encoded"
               in r.getMessage() for r in caplog.records)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
               if "reward_mean" in json.loads(x)]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert metrics and len(samples) == 16                      # every row of both rollouts
    direct = np.array([reference(setup, [{"role": "user", "content": s["prompt"]}],
                                 s["completion"]) for s in samples])
    np.testing.assert_allclose([s["reward"] for s in samples], direct, atol=1e-4, rtol=1e-4)
    for it, m in enumerate(metrics):
        np.testing.assert_allclose(m["reward_mean"], direct[8 * it:8 * it + 8].mean(),
                                   atol=1e-4, rtol=1e-4)


def test_eval_stage_scores_with_the_reward_models_own_tokenizer(setup):
    """`jaxalign eval` with that reward model: each completion's reward (generations file) is
    transformers' score of the conversation in the reward model's tokenization; the preference
    pairs are tokenized with its tokenizer too."""
    from jaxalign.evaluate import from_raw, run_eval
    from jaxalign.synth import prefs
    _, pairs = prefs.write_splits(setup["root"] / "prefs", 0, 8, seed=0)
    out = setup["root"] / "eval"
    cfg = from_raw({"out_dir": str(out),
                    "models": {"policies": {"pol": str(setup["policy"])},
                               "reward_model": str(setup["rm_dir"])},
                    "data": {"prompts": [{"path": str(setup["prompts"])}],
                             "pairs": [{"path": str(pairs)}]},
                    "eval": {"batch_size": 4, "seq_len": 192, "limit": 8, "max_new_tokens": 8,
                             "temperature": 0.0, "samples": 4}})
    results = run_eval(cfg)
    assert results["rm/pairs"] == 8
    rows = [json.loads(x) for x in Path(pairs).read_text().splitlines()][:8]
    score = {side: np.array([reference(setup, [{"role": "user", "content": r["prompt"]}], r[side])
                             for r in rows]) for side in ("chosen", "rejected")}
    assert results["rm/chosen"] == pytest.approx(score["chosen"].mean(), abs=1e-4)
    assert results["rm/rejected"] == pytest.approx(score["rejected"].mean(), abs=1e-4)
    assert results["rm/accuracy"] == pytest.approx((score["chosen"] > score["rejected"]).mean())
    rows = [json.loads(x) for x in (out / "generations_pol.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    direct = np.array([reference(setup, [{"role": "user", "content": r["prompt"]}], r["completion"])
                       for r in rows])
    np.testing.assert_allclose([r["reward"] for r in rows], direct, atol=1e-4, rtol=1e-4)
    assert results["gen/pol/reward"] == pytest.approx(direct.mean(), abs=1e-4)


def test_a_critic_cannot_start_from_a_reward_model_of_another_tokenizer(setup):
    from jaxalign.train.rl.rewards import RewardModelError
    raw = {"out_dir": str(setup["root"] / "ppo_refused"), "algorithm": "ppo",
           "model": {"path": str(setup["policy"]), "scan_layers": False},
           "data": {"prompts": str(setup["prompts"]), "chat": True, "max_prompt_len": 64},
           "rollout": {"batch_size": 4, "max_new_tokens": 8},
           "reward": {"model": str(setup["rm_dir"]), "functions": []},
           "ppo": {"value_model": "separate", "critic_init": "reward"},
           "train": {"iterations": 1, "tensorboard": False, "progress": False},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    with pytest.raises(RewardModelError, match=r"ppo\.critic_init: reward needs a reward model "
                                               r"with the policy's tokenizer"):
        run_rl(from_dict(RLConfig, apply_overrides(raw, [])), devices=jax.devices()[:1])
