"""Every algorithm on two processes (2 fake CPU devices each, gloo over loopback) writes the
metrics.jsonl of one process with the same four devices, on the same global batch; a
checkpoint written by the two-process run resumes in one process and continues as the
uninterrupted runs do; a launch under SLURM's variables joins by JAX's own detection.

Three launches serve every test (tests/multiproc.py): two processes running all five
algorithms, then one process running the references and the resumes. This file, run as a
script, is the worker: it runs a JSON list of jobs in one process, one after another.
"""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from multiproc import free_port, launch, python, worker_env

TIMEOUT_S = 600
STEPS, RESUME_AT = 4, 2

COMMON = {"train": {"tensorboard": False, "progress": False}}
SUPERVISED = {"log_every": 1, "save_every": RESUME_AT}
RL = {"iterations": STEPS, "save_every": RESUME_AT, "sample_every": 1, "num_samples": 6}
ROLLOUT = {"max_new_tokens": 6, "temperature": 1.0}


def _configs(root: Path) -> dict[str, tuple[str, dict]]:
    """name -> (recipe, raw config without out_dir). Meshes differ on purpose: weights split
    across processes (fsdp), tensor-parallel inside a process, pure data parallel."""
    model = {"path": str(root / "model"), "scan_layers": False}
    tasks, prefs = root / "tasks", root / "prefs"
    optim = {"lr": 3e-3, "schedule": "constant", "max_grad_norm": 1.0}
    prompts = {"prompts": str(tasks / "train.jsonl"), "chat": True, "max_prompt_len": 96}
    return {
        "sft": ("sft", {"model": model, "optim": optim, "mesh": {"fsdp": -1},
                        "data": {"train": [{"path": str(tasks / "train.jsonl")}], "seq_len": 64,
                                 "pack": False},
                        "train": {"steps": STEPS, "batch_size": 8, **SUPERVISED}}),
        "rm": ("rm", {"model": model, "optim": optim, "mesh": {"data": 2, "fsdp": 1, "tensor": 2},
                      "data": {"train": [{"path": str(prefs / "train.jsonl")}],
                               "eval": [{"path": str(prefs / "eval.jsonl")}], "seq_len": 96,
                               "pack": False},
                      "train": {"steps": STEPS, "batch_size": 4, "eval_every": STEPS,
                                "eval_batches": 1, **SUPERVISED}}),
        "dpo": ("dpo", {"model": model, "optim": optim, "mesh": {"data": 2, "fsdp": 2, "tensor": 1},
                        "data": {"train": [{"path": str(prefs / "train.jsonl")}], "seq_len": 96,
                                 "pack": False},
                        "train": {"steps": STEPS, "batch_size": 4, **SUPERVISED}}),
        "ppo": ("ppo", {"algorithm": "ppo", "model": model, "optim": optim, "data": prompts,
                        "mesh": {"data": 1, "fsdp": 2, "tensor": 2},
                        "rollout": {"batch_size": 8, **ROLLOUT},
                        "reward": {"functions": ["jaxalign.rewards:digits"], "normalize": "running"},
                        "ppo": {"epochs": 2, "minibatches": 2, "kl_coef": 0.05, "kl_target": 1.0},
                        "train": RL}),
        # 3 prompts x 4 completions = 12 rows, 6 per process: the second prompt's group has
        # two rows on each process.
        "grpo": ("ppo", {"algorithm": "grpo", "model": model, "optim": optim, "data": prompts,
                         "mesh": {"data": 2, "fsdp": 1, "tensor": 2},
                         "rollout": {"batch_size": 3, "num_generations": 4, **ROLLOUT},
                         "reward": {"functions": ["jaxalign.rewards:digits"]},
                         "ppo": {"epochs": 2, "minibatches": 2},
                         "train": RL}),
    }


def _job(name: str, configs: dict, out_dir: Path, **overrides) -> dict:
    recipe, raw = configs[name]
    raw = json.loads(json.dumps(raw))
    raw["out_dir"] = str(out_dir)
    for section, values in COMMON.items():
        raw.setdefault(section, {}).update(values)
    for section, values in overrides.items():
        raw.setdefault(section, {}).update(values)
    return {"recipe": recipe, "raw": raw}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_metrics(got: Path, want: Path) -> float:
    a, b = _records(got), _records(want)
    assert [r["step"] for r in a] == [r["step"] for r in b], (got, want)
    worst = 0.0
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x.keys() ^ y.keys())
        for k in x:
            assert np.isclose(x[k], y[k], rtol=1e-5, atol=1e-5), (got.name, x["step"], k, x[k], y[k])
            worst = max(worst, abs(x[k] - y[k]))
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    from jaxalign.synth import prefs, tasks

    root = tmp_path_factory.mktemp("mp")
    make_tiny_model(root / "model")
    tasks.write_splits(root / "tasks", 64, 8)
    prefs.write_splits(root / "prefs", 32, 8)
    configs = _configs(root)

    two = [_job(n, configs, root / "two" / n) for n in configs]
    # SIGTERM reaches process 1 only, during iteration RESUME_AT's rewards: both processes
    # drop that rollout and stop together, with the last finished iteration checkpointed
    # (the programs are the PPO run's).
    stop = _job("ppo", configs, root / "two" / "ppo_sigterm",
                reward={"functions": ["test_multiprocess_train:digits"]})
    two.append(dict(stop, expect_stop=True))
    # A reward function that raises on process 1 only fails the iteration on both.
    fail = _job("ppo", configs, root / "two" / "ppo_reward_error",
                reward={"functions": ["test_multiprocess_train:fails_on_1"]})
    two.append(dict(fail, expect_error="raised ValueError: process 1 fails"))
    (root / "two.json").write_text(json.dumps(two))
    port = free_port()
    launch([python(__file__, str(root / "two.json")) for _ in range(2)],
           [worker_env(2, JAXALIGN_COORDINATOR=f"127.0.0.1:{port}", JAXALIGN_NUM_PROCESSES="2",
                       JAXALIGN_PROCESS_ID=str(i)) for i in range(2)], TIMEOUT_S)

    # The two-process runs' checkpoints of step RESUME_AT, continued by one process.
    for n in configs:
        dst = root / "resumed" / n
        shutil.copytree(root / "two" / n, dst)
        for step in (dst / "checkpoints").iterdir():
            if step.name.isdigit() and int(step.name) > RESUME_AT:
                shutil.rmtree(step)
    one = [_job(n, configs, root / "one" / n) for n in configs]
    one += [_job(n, configs, root / "resumed" / n) for n in configs]
    one.append(_job("ppo", configs, root / "two" / "ppo_sigterm",
                    reward={"functions": ["test_multiprocess_train:digits"]}))
    (root / "one.json").write_text(json.dumps(one))
    launch([python(__file__, str(root / "one.json"))], [worker_env(4)], TIMEOUT_S)
    return root


@pytest.mark.slow  # spawns several JAX processes
@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_two_processes_write_one_process_metrics(runs, name):
    worst = _assert_same_metrics(runs / "two" / name, runs / "one" / name)
    print(f"{name}: 2 processes vs 1, max |diff| {worst:.2e}")
    if name in ("ppo", "grpo"):   # samples gathered from both processes, written once
        assert (runs / "two" / name / "samples.jsonl").read_text() == \
            (runs / "one" / name / "samples.jsonl").read_text()
    assert json.loads((runs / "two" / name / "worker-2p.json").read_text())["process_count"] == 2


@pytest.mark.slow  # spawns several JAX processes
@pytest.mark.parametrize("name", ["sft", "rm", "dpo", "ppo", "grpo"])
def test_two_process_checkpoint_resumes_in_one_process(runs, name):
    _assert_same_metrics(runs / "resumed" / name, runs / "one" / name)


@pytest.mark.slow  # spawns several JAX processes
def test_sigterm_on_one_process_stops_both_at_one_iteration(runs):
    """Process 1 alone got SIGTERM in iteration RESUME_AT: both processes stopped at the same
    point with one checkpoint (a process that went on alone would wait for the other
    forever); rerun (here in one process) it continues to the uninterrupted run's metrics.
    Every stop decision goes through `distributed.any_process`."""
    report = json.loads((runs / "two" / "ppo_sigterm" / "worker-2p.json").read_text())
    assert report["stopped"].startswith("stopped by signal"), report
    _assert_same_metrics(runs / "two" / "ppo_sigterm", runs / "one" / "ppo")


CALLS = {"n": 0}


def digits(prompts, completions):
    """jaxalign.rewards:digits, which SIGTERMs process 1 (only) at its call RESUME_AT."""
    import jax
    from jaxalign.rewards import digits as score
    CALLS["n"] += 1
    if jax.process_index() == 1 and CALLS["n"] == RESUME_AT:
        os.kill(os.getpid(), signal.SIGTERM)
    return score(prompts, completions)


def fails_on_1(prompts, completions):
    """Scores like digits, but raises on process 1 at its call RESUME_AT."""
    import jax
    from jaxalign.rewards import digits as score
    CALLS["fails"] = CALLS.get("fails", 0) + 1
    if jax.process_index() == 1 and CALLS["fails"] == RESUME_AT:
        raise ValueError("process 1 fails")
    return score(prompts, completions)


@pytest.mark.slow  # spawns several JAX processes
def test_reward_error_on_one_process_fails_both(runs):
    """Process 1's reward function raised in iteration RESUME_AT: both processes stopped with
    the same one-line error, and iteration RESUME_AT - 1 is checkpointed."""
    from jaxalign.checkpoint import TrainCheckpoints
    run = runs / "two" / "ppo_reward_error"
    report = json.loads((run / "worker-2p.json").read_text())
    assert report["error"].startswith(f"iteration {RESUME_AT}: reward function "
                                      "test_multiprocess_train:fails_on_1 raised ValueError: "
                                      "process 1 fails"), report
    assert TrainCheckpoints(run).latest_step() == RESUME_AT - 1


def _yaml(path: Path, raw: dict) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow  # spawns several JAX processes
def test_unsplittable_batch_refused_in_one_line(runs):
    """`jaxalign --coordinator ... --num-processes 2 --process-id I sft` with a mesh that
    gives both processes every row (tensor=4 across them): each process prints one error
    line naming the fix and exits 1 before a step runs."""
    out = runs / "refused"
    raw = _job("sft", _configs(runs), out, mesh={"data": 1, "fsdp": 1, "tensor": 4})["raw"]
    config = _yaml(out.with_suffix(".yaml"), raw)
    port = free_port()
    logs = launch([python("-m", "jaxalign.cli", "--coordinator", f"127.0.0.1:{port}",
                          "--num-processes", "2", "--process-id", str(i), "sft", str(config))
                   for i in range(2)], [worker_env(2) for _ in range(2)], TIMEOUT_S, returncode=1)
    for log in logs:
        errors = [line for line in log.splitlines() if line.startswith("jaxalign: error:")]
        assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
        assert "does not give each of the 2 processes its own rows" in errors[0], errors
        assert "make data x fsdp a multiple of 2" in errors[0], errors
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.slow  # spawns several JAX processes
def test_slurm_variables_join_two_processes(runs):
    """`jaxalign sft` under the variables srun sets for 2 tasks on one node: JAX's SLURM
    detection finds the coordinator (first node of SLURM_STEP_NODELIST, port from the job
    id), the count and the ids; the run writes the one-process metrics."""
    port = free_port(65535 - 2 ** 12 + 1, 65535)
    job_id = str(port - (65535 - 2 ** 12 + 1) + 2 ** 12 * 7)   # port = job id % 4096 + 61440
    out = runs / "slurm"
    config = _yaml(out.with_suffix(".yaml"), _job("sft", _configs(runs), out)["raw"])
    envs = [worker_env(2, SLURM_JOB_ID=job_id, SLURM_STEP_NODELIST="localhost",
                       SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                       SLURM_STEP_NUM_NODES="1") for i in range(2)]
    logs = launch([python("-m", "jaxalign.cli", "sft", str(config)) for _ in range(2)], envs,
                  TIMEOUT_S)
    assert "joined (slurm)" in logs[0] and "4 global devices" in logs[0], logs[0][-2000:]
    _assert_same_metrics(out, runs / "one" / "sft")


def test_cluster_detection_and_bad_settings(monkeypatch):
    """Which environments join (without joining: every case stops before
    jax.distributed.initialize), and the one-line refusals of incomplete settings."""
    from jaxalign import distributed
    from jaxalign.config import ConfigError

    for k in list(os.environ):
        if k.startswith(("SLURM_", "OMPI_", "TPU_", "JAXALIGN_", "JAX_COORDINATOR",
                         "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")):
            monkeypatch.delenv(k)
    assert distributed.detected_cluster() is None and distributed.initialize() is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "1",
             "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    assert distributed.detected_cluster() is None      # one task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.detected_cluster() == "slurm"
    monkeypatch.setenv("JAXALIGN_DISTRIBUTED", "off")
    assert distributed.initialize() is None
    monkeypatch.setenv("JAXALIGN_DISTRIBUTED", "maybe")
    with pytest.raises(ConfigError, match="JAXALIGN_DISTRIBUTED='maybe': expected auto, on or off"):
        distributed.initialize()
    monkeypatch.setenv("JAXALIGN_DISTRIBUTED", "auto")
    for k in slurm:
        monkeypatch.delenv(k)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")
    assert distributed.detected_cluster() == "tpu"
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1.0;tcp://10.0.0.1:1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert distributed.detected_cluster() == "openmpi"
    with pytest.raises(ConfigError, match="without the number of processes"):
        distributed.initialize("127.0.0.1:1")
    with pytest.raises(ConfigError, match="process id 2 is not in"):
        distributed.initialize("127.0.0.1:1", 2, 2)
    monkeypatch.setenv("JAXALIGN_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAXALIGN_NUM_PROCESSES='two': expected an integer"):
        distributed.initialize("127.0.0.1:1")


# ----------------------------------------------------------------------------- the worker

def worker(jobs_path: str) -> None:
    import jax
    from jaxalign import distributed, runtime
    from jaxalign.config import JaxalignError, from_dict
    from jaxalign.train.recipes import RECIPES

    runtime.configure_jax()    # as the CLI: the persistent compilation cache serves reruns
    distributed.initialize()   # from JAXALIGN_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID
    for job in json.loads(Path(jobs_path).read_text()):
        config_cls, run_fn = RECIPES[job["recipe"]].load()
        out = Path(job["raw"]["out_dir"])
        report = {"process_count": jax.process_count()}
        try:
            run_fn(from_dict(config_cls, job["raw"]), job["raw"])
        except KeyboardInterrupt as e:
            if not job.get("expect_stop"):
                raise
            report["stopped"] = str(e)
        except JaxalignError as e:
            if not job.get("expect_error") or job["expect_error"] not in str(e):
                raise
            report["error"] = str(e)
        if jax.process_index() == 0:
            (out / f"worker-{jax.process_count()}p.json").write_text(json.dumps(report))
    if jax.process_count() > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    worker(sys.argv[1])
