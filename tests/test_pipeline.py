"""`jaxalign pipeline` on the tiny model: every stage's outputs; an interrupted pipeline
(SIGINT inside the PPO stage) resumes that stage from its checkpoint without redoing the
finished ones; a changed stage reruns itself and its successors only."""

import json
import os
import signal
from pathlib import Path

import jax
import pytest

from jaxalign.config import ConfigError, apply_overrides, from_dict, load_yaml
from jaxalign.pipeline import PipelineConfig, plan, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CALLS = {"n": 0, "armed": False}


def interrupt_once(prompts, completions):
    """A reward function that sends this process SIGINT once, at its 4th call when armed: the
    RL driver then drops iteration 4's rollout, keeps iteration 3's checkpoint and stops, as
    on Ctrl-C."""
    CALLS["n"] += 1
    if CALLS["armed"] and CALLS["n"] == 4:
        CALLS["armed"] = False
        os.kill(os.getpid(), signal.SIGINT)
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    from jaxalign.synth import prefs, tasks
    root = tmp_path_factory.mktemp("pipe")
    model = make_tiny_model(root / "model")
    tasks.write_splits(root / "tasks", 300, 20)
    prefs.write_splits(root / "prefs", 128, 16)
    return root, model


def config(setup, *overrides) -> PipelineConfig:
    root, model = setup
    raw = load_yaml(str(ROOT / "configs" / "tiny_pipeline.yaml"), [
        f"out_dir={root / 'pipe'}", f"model={model}",
        f"data.sets.sft.sources=[{root / 'tasks/train.jsonl'}]",
        f"data.sets.prefs.sources=[{root / 'prefs/train.jsonl'}]",
        "ppo.reward.functions=[test_pipeline:interrupt_once]", "ppo.reward.model='{rm}'",
        *overrides])
    for stage in ("sft", "rm", "dpo"):
        raw[stage]["train"]["progress"] = False
    raw["ppo"]["train"]["progress"] = False
    return from_dict(PipelineConfig, raw)


def _mtime(path):
    return Path(path).stat().st_mtime_ns


@pytest.mark.slow  # runs a whole pipeline, twice
def test_pipeline_runs_resumes_and_reruns_changed_stages(setup, caplog):
    cfg = config(setup)
    pipe = Path(cfg.out_dir)
    devices = jax.devices()[:1]
    CALLS["armed"] = True
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, devices)
    state = json.loads((pipe / "pipeline.json").read_text())["stages"]
    assert {k: v["done"] for k, v in state.items()} == {"data": True, "sft": True, "rm": True,
                                                        "ppo": False}
    ppo_first = [json.loads(l)["step"] for l in (pipe / "ppo/metrics.jsonl").read_text().splitlines()]
    assert ppo_first == [1, 2, 3]
    before = {s: _mtime(pipe / s / f) for s, f in
              (("data", "stats.json"), ("sft", "metrics.jsonl"), ("rm", "metrics.jsonl"))}

    # rerun: finished stages skipped, ppo resumed from its checkpoint at iteration 3
    caplog.clear()
    with caplog.at_level("INFO"):
        steps = run_pipeline(cfg, devices)
    assert [(s["stage"], s["action"]) for s in steps] == [
        ("data", "skip"), ("sft", "skip"), ("rm", "skip"), ("ppo", "resume"), ("dpo", "run"),
        ("eval", "run"), ("export", "run"), ("report", "run")]
    assert "resumed" in caplog.text and "at 3" in caplog.text
    assert before == {s: _mtime(pipe / s / f) for s, f in
                      (("data", "stats.json"), ("sft", "metrics.jsonl"), ("rm", "metrics.jsonl"))}
    ppo_steps = [json.loads(l)["step"] for l in (pipe / "ppo/metrics.jsonl").read_text().splitlines()]
    assert ppo_steps == [1, 2, 3, 4, 5, 6]

    # every stage's outputs, wired by path
    assert (pipe / "data/sft/train.jsonl").stat().st_size and (pipe / "data/prefs/eval.jsonl").exists()
    assert "near_duplicate" in (pipe / "data/stats.md").read_text()
    for s in ("sft", "rm", "ppo", "dpo"):
        assert (pipe / s / "run.json").exists() and (pipe / s / "checkpoints").is_dir()
    assert load_yaml(str(pipe / "sft/config.yaml"))["data"]["train"] == [str(pipe / "data/sft/train.jsonl")]
    assert load_yaml(str(pipe / "dpo/config.yaml"))["model"]["path"] == str(pipe / "sft")
    assert load_yaml(str(pipe / "ppo/config.yaml"))["reward"]["model"] == str(pipe / "rm")
    results = json.loads((pipe / "eval/eval.json").read_text())
    for name in ("ppo", "dpo"):  # every policy against the sft reference, judged by the rm run
        assert {f"winrate/{name}", f"kl/{name}/sequence", f"gen/{name}/rouge_l",
                f"dpo/{name}/accuracy"} <= set(results), sorted(results)
    assert "rm/accuracy" in results and "ppl/sft/perplexity" in results
    models = load_yaml(str(pipe / "eval/config.yaml"))["models"]
    assert models == {"policies": {s: str(pipe / s) for s in ("sft", "ppo", "dpo")},
                      "reference": "sft", "reward_model": str(pipe / "rm")}
    hf = pipe / "export/hf"
    assert (hf / "config.json").exists() and list(hf.glob("*.safetensors"))
    md = (pipe / "report/report.md").read_text()
    at = [md.index(f"## {s} (") for s in ("data", "sft", "rm", "ppo", "dpo", "eval")]
    assert at == sorted(at)  # the stage order, not the folders' alphabetical one
    for s in ("sft", "rm", "ppo", "dpo"):
        png = pipe / "report" / f"{s}_curves.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and f"]({png.name})" in md
    assert (pipe / "report/timing.png").exists() and (pipe / "report/eval_policies.png").exists()
    summary = (pipe / "report/summary.md").read_text()
    assert "| policy |" in summary
    # the headline: each policy's exact-match gain over sft with its paired interval
    assert "- ppo - sft, held-out exact match: " in summary and " on 8 prompts (interval " in summary
    _starts_from_merged_lora_run(pipe / "sft")

    # a changed dpo section: dpo and what follows rerun, nothing before it
    kept = {s: _mtime(pipe / s / "metrics.jsonl") for s in ("sft", "rm", "ppo")}
    old_dpo = _mtime(pipe / "dpo/metrics.jsonl")
    changed = config(setup, "dpo.dpo.beta=0.2")
    assert [(s["stage"], s["action"]) for s in plan(changed)] == [
        ("data", "skip"), ("sft", "skip"), ("rm", "skip"), ("ppo", "skip"), ("dpo", "rerun"),
        ("eval", "rerun"), ("export", "rerun"), ("report", "rerun")]
    run_pipeline(changed, devices)
    assert kept == {s: _mtime(pipe / s / "metrics.jsonl") for s in ("sft", "rm", "ppo")}
    assert _mtime(pipe / "dpo/metrics.jsonl") != old_dpo
    assert load_yaml(str(pipe / "dpo/config.yaml"))["dpo"]["beta"] == 0.2
    assert all(s["action"] == "skip" for s in plan(changed))


def _starts_from_merged_lora_run(run):
    """A stage started from a LoRA run (rm, ppo, dpo from the LoRA sft) computes what that
    run computes: its adapters folded in, the new (zero) adapters on top, not in their place."""
    import numpy as np
    from jaxalign import checkpoint, sharding
    from jaxalign.config import LoRAConfig, MeshConfig, ModelSource
    from jaxalign.models import functional, lora
    from jaxalign.train.setup import load_policy
    mesh = sharding.make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    cfg, params, _, _ = checkpoint.load_model(run, mesh, scan_layers=False)
    assert cfg.lora_rank == 8
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % cfg.vocab_size + 3
    want = functional.apply(cfg, params, tokens)[0]
    with jax.set_mesh(mesh):
        p = load_policy(ModelSource(path=str(run), scan_layers=False), LoRAConfig(rank=4), mesh, 0)
    got = functional.apply(p.cfg, lora.combine(p.trainable, p.frozen), tokens)[0]
    assert p.cfg.lora_rank == 4
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_pipeline_config_errors_name_the_stage(setup):
    with pytest.raises(ConfigError, match=r"sft: unknown config key 'train.stepz'"):
        plan(config(setup, "sft.train.stepz=3"))
    with pytest.raises(ConfigError, match=r"rm.out_dir: the pipeline sets it"):
        config(setup, "rm.out_dir=x")
    with pytest.raises(ConfigError, match=r"\{dpo\} names no earlier stage"):
        plan(config(setup, "rm.data.train=['{dpo}/x.jsonl']"))
    with pytest.raises(ConfigError, match="stages: unknown stage"):
        config(setup, "stages=[data, sfx]")


def test_cli_pipeline_bad_input_is_one_line(setup, tmp_path, capsys):
    from jaxalign import cli
    with pytest.raises(SystemExit) as e:
        cli.main(["pipeline"])
    assert e.value.code == 2
    root, model = setup
    args = ["pipeline", str(ROOT / "configs" / "tiny_pipeline.yaml"), f"out_dir={tmp_path / 'p'}",
            f"model={model}", "sft.train.stepz=3"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "jaxalign: error: sft: unknown config key 'train.stepz'" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()  # nothing ran: every section is checked first


def test_runtime_flags_reach_every_stage(setup):
    from jaxalign.config import MeshConfig
    from jaxalign.pipeline import runtime_overrides
    raw = load_yaml(str(ROOT / "configs" / "tiny_pipeline.yaml"))
    out = runtime_overrides(raw, MeshConfig(data=2, fsdp=-1, tensor=1), "bfloat16")
    assert "sft.mesh.data=2" in out and "ppo.model.dtype=bfloat16" in out
    assert "eval.eval.dtype=bfloat16" in out and not [o for o in out if o.startswith("eval.mesh")]
    cfg = config(setup, *out)
    steps = {s["stage"]: s["config"] for s in plan(cfg)}
    assert steps["dpo"].model.dtype == "bfloat16" and steps["rm"].mesh.data == 2
    assert steps["eval"].eval.dtype == "bfloat16"


def test_kto_and_grpo_stages_are_wired_like_the_others(setup):
    """Any recipe is a stage: kto (unpaired rows) and ppo's other algorithms start from the sft
    run, and eval compares every policy stage."""
    cfg = config(setup, "kto.data.train=['{data}/prefs/train.jsonl']", "kto.train.steps=2",
                 "kto.train.batch_size=8", "ppo.algorithm=grpo", "ppo.rollout.num_generations=2")
    steps = {s["stage"]: s for s in plan(cfg)}
    pipe = Path(cfg.out_dir)
    assert list(steps) == ["data", "sft", "rm", "ppo", "dpo", "kto", "eval", "export", "report"]
    assert steps["kto"]["config"].model.path == str(pipe / "sft")
    assert steps["ppo"]["config"].algorithm == "grpo"
    assert set(steps["eval"]["config"].models.policies) == {"sft", "ppo", "dpo", "kto"}
    assert steps["export"]["config"].model == str(pipe / "kto")


def test_main_job_rewards_training_rows_only_and_evaluates_held_out_tasks(tmp_path):
    """configs/smollm2_rlhf.yaml (`scripts/rlhf.sh`): the RL stage's verifiable reward reads
    the `answer` column of the training prompts only; its held-out check (best policy, early
    stop) uses the rows the data stage held out of SFT; the eval stage scores that best policy
    against SFT on all 200 held-out task prompts, which no stage trains or selects on."""
    raw = load_yaml(str(ROOT / "configs" / "smollm2_rlhf.yaml"),
                    [f"out_dir={tmp_path}", f"model={tmp_path / 'model'}"])
    steps = {s["stage"]: s["config"] for s in plan(from_dict(PipelineConfig, raw))}
    rl, ev = steps["ppo"], steps["eval"]
    assert rl.reward.functions == ("jaxalign.rewards:task_match",)
    assert rl.reward.model == str(tmp_path / "rm") and len(rl.reward.weights) == 2
    assert rl.data.prompts.path == str(tmp_path / "data/sft/train.jsonl")
    assert rl.data.eval_prompts.path == str(tmp_path / "data/sft/eval.jsonl")
    assert rl.train.best_metric == "eval/exact_match" and rl.train.early_stop_patience > 0
    assert [p.path for p in ev.data.prompts] == ["data/tasks/eval.jsonl"] and ev.eval.limit == 0
    assert ev.models.policies == {"sft": str(tmp_path / "sft"), "ppo": str(tmp_path / "ppo/best")}
    assert ev.models.reference == "sft" and steps["export"].model == str(tmp_path / "ppo/best")
    assert raw["data"]["sets"]["sft"]["sources"] == ["data/tasks/train.jsonl"]
