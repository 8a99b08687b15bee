"""Issue 24's "silently wrong" and "crash instead of one line" findings, each reproduced as
reported and shown to end safely: optimizer settings refused at config load, and a state
made non-finite by the update never saved, called good or exported (10); a NaN reward
model score kept out of the reward moments, the KL controller and the checkpoints (12);
`generate --chat` without a chat template, `plan --devices 0`, a config that is not UTF-8
(17); the allocator re-exec not importing from the working directory (18); sequence lengths
past the model's max_position_embeddings refused (11).

Runs are the fault harness's tiny configs (`scripts/faults.py command`), in this process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import faults as harness          # scripts/faults.py (conftest puts scripts/ on sys.path)
from jaxalign import cli
from jaxalign.checkpoint import TrainCheckpoints
from jaxalign.config import OptimConfig

pytestmark = pytest.mark.slow  # runs the CLI end to end in subprocesses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return harness.prepare(tmp_path_factory.mktemp("hardening"))


def _cli(algo, out, paths, *extra) -> int:
    return cli.main(harness.command(algo, out, paths, *extra)[3:])


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("jaxalign: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _saved(run_dir: Path) -> list[int]:
    if not (run_dir / "checkpoints").exists():
        return []
    ckpts = TrainCheckpoints(run_dir)
    try:
        return list(ckpts.manager.all_steps())
    finally:
        ckpts.close()


# ----------------------------------------------------------------------------- 10: optimizer

@pytest.mark.parametrize("key, value", [("b2", "1"), ("b1", "1.5"), ("b2", "-0.1"),
                                        ("eps", "0"), ("weight_decay", "-1")])
def test_bad_adam_settings_refused_at_load(paths, tmp_path, capsys, key, value):
    assert _cli("sft", tmp_path / "run", paths, f"optim.{key}={value}") == 1
    assert f"optim.{key} must be" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_state_is_never_saved_or_exported(paths, tmp_path, capsys, monkeypatch):
    """The reported run: optim.b2=1 makes every parameter NaN after step 1 while its loss and
    grad norm are finite. With the config check switched off (the second line of defence
    is what is tested), train.max_bad_steps=3 and export_hf: exit 1, one line saying the
    update made the state non-finite, no checkpoint and no export; the same command with
    a sane b2 then runs to the end in that directory."""
    run = tmp_path / "run"
    monkeypatch.setattr(OptimConfig, "__post_init__", lambda self: None)
    args = ("train.max_bad_steps=3", "train.export_hf=true", "train.save_every=1",
            "train.steps=3")
    assert _cli("sft", run, paths, "optim.b2=1", *args) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "step 1: the optimizer update made the parameters or optimizer state non-finite" in line
    assert "No checkpoint was saved yet" in line and "intact" not in line
    assert _saved(run) == [] and not (run / "hf").exists()
    monkeypatch.undo()
    assert _cli("sft", run, paths, *args) == 0
    assert _saved(run)[-1] == 3 and (run / "hf" / "config.json").exists()


def test_step_reports_state_finiteness():
    """The jitted step's one fused check: Adam with b2 = 1 (0 / 0 in its bias correction)
    from a finite loss and gradient gives finite=1, state_finite=0."""
    import jax.numpy as jnp
    import optax
    from jaxalign.train.step import init_state, make_train_step

    def loss_fn(p, frozen, batch, rng):
        return jnp.sum((p["w"] - batch["x"]) ** 2), {"weight": jnp.float32(1.0)}

    for b2, want in ((0.999, 1.0), (1.0, 0.0)):
        opt = optax.adam(1e-2, b2=b2)
        state = init_state({"w": jnp.ones(3)}, opt, 0)
        _, m = make_train_step(loss_fn, opt, optax.constant_schedule(1e-2))(
            state, None, {"x": jnp.zeros((1, 3))})
        assert float(m["finite"]) == 1.0 and float(m["state_finite"]) == want, b2


def test_all_finite_finds_one_bad_element_in_any_leaf():
    """`all_finite` (matrices through a product with zeros on CPU, the rest summed): one inf or
    NaN anywhere in any leaf, fp32 or bf16, matrix or vector, is found; finite trees pass."""
    import jax
    import jax.numpy as jnp
    from jaxalign.train.step import all_finite

    tree = {"w": jnp.ones((6, 40, 24)), "e": jnp.ones((300, 16)), "v": jnp.ones(7),
            "h": jnp.ones((5, 8), jnp.bfloat16), "n": jnp.arange(3)}
    check = jax.jit(all_finite)
    assert bool(check(tree))
    for key, index in (("w", (5, 39, 23)), ("w", (0, 0, 0)), ("e", (150, 3)), ("v", (6,)),
                       ("h", (4, 7))):
        for bad in (jnp.inf, -jnp.inf, jnp.nan):
            broken = dict(tree, **{key: tree[key].at[index].set(bad)})
            assert not bool(check(broken)), (key, index, bad)


# ----------------------------------------------------------------------------- 12: NaN rewards

def test_non_finite_reward_rows_do_not_reach_moments_or_kl():
    """Rows with a NaN / inf reward are dropped: the running moments and the batch statistics
    see the finite rows only, and the KL controller's input stays finite."""
    from jaxalign.losses.ppo import adaptive_kl_update
    from jaxalign.train.rl.config import RewardConfig
    from jaxalign.train.rl.hosts import finite_rows, rollout_metrics
    from jaxalign.train.rl.rewards import Rewarder

    raw = np.array([1.0, np.nan, 3.0, np.inf])
    g = {"raw": raw, "part:reward/model": raw.copy(), "lengths": np.ones(4), "eos": np.ones(4, bool),
         "entropy_sum": np.ones(4), "tokens": np.ones(4), "logprob_gap": np.zeros(4)}
    g, keep = finite_rows(g)
    assert keep.tolist() == [True, False, True, False]
    assert np.isfinite(g["raw"]).all() and np.isfinite(g["part:reward/model"]).all()
    assert all(np.isfinite(v) for v in rollout_metrics(g).values())
    for normalize in ("running", "batch"):
        rw = Rewarder(RewardConfig(model="rm", normalize=normalize))
        scores = rw.normalise(g["raw"], keep)
        assert np.isfinite(scores).all()
        assert scores[keep].mean() == pytest.approx(0.0, abs=1e-9)   # whitened over kept rows
    run = Rewarder(RewardConfig(model="rm", normalize="running"))
    run.normalise(g["raw"], keep)
    assert run.moments.count == 2 and run.moments.mean == pytest.approx(2.0)
    assert np.isfinite(adaptive_kl_update(0.1, 1.5, 4, target=3.0, horizon=16))
    _, none = finite_rows({"raw": np.array([np.nan, np.nan])})
    assert not none.any()


def _nan_reward_model(paths, out: Path) -> Path:
    import jax.numpy as jnp
    from jaxalign import checkpoint
    from jaxalign.convert import hf
    cfg, params, hf_config, _ = checkpoint.load_model(paths["model"], num_labels=1, seed=3)
    params = dict(params, score=jnp.full_like(params["score"], jnp.nan))
    return hf.save(out, cfg, params, hf_config=hf_config, source_dir=paths["model"])


def test_some_nan_reward_rows_are_dropped_and_the_run_goes_on(paths, tmp_path):
    """A reward model whose embedding rows of some token ids (none of the prompts') are NaN:
    the completions that sample one score NaN, the others finite. Those rows are dropped
    (counted in metrics.jsonl's reward_dropped), the run finishes, and every reward moment,
    KL coefficient and metric stays finite."""
    import jax.numpy as jnp
    from jaxalign import checkpoint
    from jaxalign.convert import hf
    from jaxalign.tokenizer import load_tokenizer
    tok = load_tokenizer(paths["model"])
    used = set()
    for line in (paths["tasks"] / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        used |= set(tok.apply_chat_template(row["messages"], tokenize=True))
    cfg, params, hf_config, _ = checkpoint.load_model(paths["model"], num_labels=1, seed=3)
    unused = np.array(sorted(set(range(len(tok))) - used))
    poisoned = unused[np.random.default_rng(0).random(len(unused)) < 0.02]
    params = dict(params, embed=params["embed"].at[jnp.asarray(poisoned)].set(jnp.nan))
    rm = hf.save(tmp_path / "rm", cfg, params, hf_config=hf_config, source_dir=paths["model"])
    run = tmp_path / "run"
    assert _cli("ppo", run, paths, f"reward.model={rm}", "reward.functions=[]",
                "reward.normalize=running", "ppo.kl_target=3.0", "train.iterations=4",
                "train.save_every=2") == 0
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("reward_dropped", 0) for r in rows) > 0, rows
    assert all(np.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    for meta in run.glob("checkpoints/*/meta/metadata"):
        state = json.loads(meta.read_text())
        assert np.isfinite(state["kl_coef"]) and all(
            np.isfinite(v) for v in state["reward_moments"].values()), state


def test_nan_reward_model_is_a_bad_step_not_a_poisoned_checkpoint(paths, tmp_path, capsys):
    """The reported run: a reward model scoring NaN, running normalisation and the adaptive
    KL controller. Every rollout row is non-finite: the iteration is refused as a bad step
    (one line, exit 1, past train.max_bad_steps), and no checkpoint holds a NaN moment or
    KL coefficient."""
    rm = _nan_reward_model(paths, tmp_path / "rm")
    run = tmp_path / "run"
    over = (f"reward.model={rm}", "reward.functions=[]", "reward.normalize=running",
            "ppo.kl_target=3.0", "train.iterations=3", "train.save_every=1",
            "train.max_bad_steps=1")
    assert _cli("ppo", run, paths, *over) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "iteration 2: every one of the" in line and "non-finite reward" in line
    assert "train.max_bad_steps=1" in line
    for meta in run.glob("checkpoints/*/meta/metadata"):
        state = json.loads(meta.read_text())
        assert np.isfinite(state["kl_coef"]) and all(
            np.isfinite(v) for v in state["reward_moments"].values()), state


# ----------------------------------------------------------------------------- 17: one line

def test_generate_chat_without_template(paths, tmp_path, capsys):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(paths["model"], model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((model / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tc))
    assert cli.main(["generate", str(model), "--prompt", "hi", "--chat",
                     "--max-new-tokens", "2"]) == 1
    assert "has no chat template" in _one_error_line(capsys.readouterr().err)


def test_plan_devices_zero_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", str(ROOT / "configs" / "tiny_sft.yaml"), "--devices", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--devices" in err and "must be >= 1" in err and len(err.strip().splitlines()) == 1


def test_config_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("out_dir: r\u00e9sum\u00e9\n".encode("latin-1"))
    assert cli.main(["sft", str(path)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "can't decode byte 0xe9" in line


# ----------------------------------------------------------------------------- 18: sys.path

def test_reexec_does_not_import_from_the_working_directory(tmp_path):
    """`jaxalign` (a console script: its own dir first on sys.path) re-executes itself under
    mimalloc; an argparse.py in the directory where it was typed must not run there."""
    from jaxalign import runtime
    if runtime.mimalloc_path() is None:
        pytest.skip("no mimalloc here: no re-exec to test")
    bin_dir, cwd = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    cwd.mkdir()
    (bin_dir / "jaxalign").write_text("import sys\nfrom jaxalign.cli import main\nsys.exit(main())\n")
    (cwd / "argparse.py").write_text("open('MARKER', 'w').write('ran')\nraise SystemExit(7)\n")
    env = harness.child_env()
    env.pop(runtime.ALLOCATOR_ENV, None)
    env.pop("LD_PRELOAD", None)
    r = subprocess.run([sys.executable, str(bin_dir / "jaxalign"), "config", "sft"], cwd=cwd,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (cwd / "MARKER").exists()


def test_reward_function_from_a_file_path(tmp_path):
    """A reward function is an importable module:function or path/file.py:function; the
    working directory is never searched implicitly."""
    from jaxalign.config import ConfigError
    from jaxalign.train.rl.rewards import load_function
    f = tmp_path / "my_rewards.py"
    f.write_text("def score(prompts, completions):\n    return [1.0] * len(completions)\n")
    assert load_function(f"{f}:score")([], ["a", "b"]) == [1.0, 1.0]
    with pytest.raises(ConfigError, match="cannot load"):
        load_function(f"{tmp_path / 'missing.py'}:score")


# ----------------------------------------------------------------------------- 11: positions

def _short_model(paths, tmp_path, max_pos: int) -> Path:
    import shutil
    model = tmp_path / "short_model"
    shutil.copytree(paths["model"], model)
    hf = json.loads((model / "config.json").read_text())
    hf["max_position_embeddings"] = max_pos
    (model / "config.json").write_text(json.dumps(hf))
    return model


def test_sequence_lengths_beyond_the_models_positions(paths, tmp_path, capsys):
    """A model trained for 64 positions: training with data.seq_len 128, generating 8 prompt
    + 100 new tokens and an RL rollout of prompt + 80 new tokens are each refused in one
    line naming the keys; within range the same commands run."""
    model = _short_model(paths, tmp_path, 64)
    assert _cli("sft", tmp_path / "sft", paths, f"model.path={model}", "data.seq_len=128") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "data.seq_len = 128 tokens exceeds the model's max_position_embeddings (64" in line
    assert not (tmp_path / "sft" / "checkpoints").exists()

    assert cli.main(["generate", str(model), "--prompt", "a b c", "--max-new-tokens", "100"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "max_new_tokens (100)" in line and "max_position_embeddings (64" in line
    assert cli.main(["generate", str(model), "--prompt", "a b c", "--max-new-tokens", "4"]) == 0

    assert _cli("ppo", tmp_path / "ppo", paths, f"model.path={model}",
                "rollout.max_new_tokens=80", "train.iterations=1") == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "rollout.max_new_tokens" in line and "max_position_embeddings (64" in line


def test_plan_refuses_seq_len_beyond_positions(paths, tmp_path, capsys):
    from jaxalign.config import ConfigError, from_dict, load_yaml
    from jaxalign.train import plan
    from jaxalign.train.sft import SFTConfig
    model = _short_model(paths, tmp_path, 64)
    raw = load_yaml(str(ROOT / "configs" / "tiny_sft.yaml"),
                    [f"model.path={model}", "data.seq_len=256"])
    with pytest.raises(ConfigError, match=r"data.seq_len = 256 tokens exceeds"):
        plan.plan("sft", from_dict(SFTConfig, raw))
