"""Fault tolerance: checkpoint integrity (a half-written or corrupted newest step is skipped,
never restored), preemption (SIGTERM -> checkpoint, exit 3, rerun continues) for every
algorithm through the real CLI, the memory pre-flight refusal, and the fault-injection
harness (scripts/faults.py) with a small count.

The runs are the harness's tiny configs (`faults.command`), so the tests and the harness
exercise the same commands."""

import json
import re
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import faults as harness          # scripts/faults.py (conftest puts scripts/ on sys.path)
from jaxalign import cli, manifest
from jaxalign import faults as jaxalign_faults
from jaxalign.checkpoint import TrainCheckpoints, load_model

SIGTERM_BOUND_S = 60.0   # one tiny step / rollout + one checkpoint write, with a loaded CI box


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return harness.prepare(tmp_path_factory.mktemp("faults"))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def _cli(algo, out, paths, *extra) -> int:
    """The harness's command, in this process (8 fake devices: the sharded path)."""
    return cli.main(harness.command(algo, out, paths, *extra)[3:])


# ----------------------------------------------------------------------------- integrity

def test_manifest_names_what_is_wrong(tmp_path):
    step = tmp_path / "7"
    (step / "state" / "d").mkdir(parents=True)
    (step / "state" / "d" / "blob").write_bytes(bytes(range(256)) * 40)
    (step / "meta").mkdir()
    (step / "meta" / "metadata").write_text('{"step": 7}')
    assert manifest.problem(step) == "no integrity manifest (its write did not finish)"
    manifest.write(step)
    assert manifest.problem(step) is None
    blob = step / "state" / "d" / "blob"
    data = bytearray(blob.read_bytes())
    data[5000] ^= 1                                   # same size, one bit flipped
    blob.write_bytes(bytes(data))
    assert manifest.problem(step) == "state/d/blob fails its CRC-32 check (corrupted)"
    blob.write_bytes(bytes(data[:4096]))              # truncated
    assert manifest.problem(step) == ("state/d/blob has 4096 bytes, the manifest says 10240 "
                                      "(truncated)")
    blob.unlink()
    assert manifest.problem(step) == "state/d/blob is missing"


def _biggest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.slow  # training runs killed and resumed
def test_incomplete_newest_checkpoint_is_skipped_never_restored(paths, tmp_path, caplog):
    """SFT saved at 3 and 6. Step 6 corrupted (a flipped byte, same size): `load_model`
    restores 3, not 6. Step 6 then truncated: the rerun skips it with a warning, sets it
    aside, resumes at 3 and ends exactly as an uninterrupted 9-step run. A step whose
    manifest never got written (killed after orbax finished) is skipped the same way."""
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _cli("sft", straight, paths, "train.steps=9") == 0
    assert _cli("sft", run, paths, "train.steps=6") == 0
    step6 = run / "checkpoints" / "6"
    blob = _biggest_file(step6 / "state")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        cfg, params, _, _ = load_model(run)
    assert "skipping checkpoint 6" in caplog.text and "CRC-32" in caplog.text
    assert TrainCheckpoints(run).latest_step() == 3
    blob.write_bytes(bytes(data[:len(data) // 3]))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert _cli("sft", run, paths, "train.steps=9") == 0
    assert "skipping checkpoint 6" in caplog.text and "(truncated)" in caplog.text
    assert "resumed" in caplog.text and f"{run} at 3" in caplog.text
    assert (run / "checkpoints.incomplete" / "6").is_dir()
    assert (run / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    assert harness.same_run(straight, run) == (True, "")
    # No manifest at the newest step: skipped too.
    (run / "checkpoints" / "9" / manifest.MANIFEST).unlink()
    assert TrainCheckpoints(run).latest_step() == 6


# ----------------------------------------------------------------------------- pre-flight

def _refusal(algo, out, paths, capsys, limit_gb: float) -> str:
    """Runs `algo` under train.memory_limit_gb=limit_gb; it must exit 1 with one error line
    and no traceback. Returns that line."""
    capsys.readouterr()
    assert _cli(algo, out, paths, f"train.memory_limit_gb={limit_gb}") == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("jaxalign: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


@pytest.mark.slow  # compiles every program of a run first
@pytest.mark.parametrize("algo", ["sft", "ppo"])
def test_memory_preflight_refuses_before_any_step(paths, tmp_path, capsys, algo):
    out = tmp_path / algo
    error = _refusal(algo, out, paths, capsys, 0.002)
    assert "memory pre-flight: the train_step program needs about" in error or \
        "memory pre-flight: the rollout program needs about" in error
    assert "(train.memory_limit_gb=0.002)" in error and re.search(r"[0-9.]+ [KM]iB short", error)
    assert "refused before the first step. Try " in error
    report = json.loads((out / "memory.json").read_text())
    pre = report["preflight"]
    assert pre["fits"] is False and pre["limit_per_device"] == int(0.002 * 2**30)
    assert pre["need_per_device"] > pre["limit_per_device"]
    assert pre["resident_per_device"]["params"] > 0 and pre["resident_per_device"]["optimizer"] > 0
    assert not _steps(out) and TrainCheckpoints(out).latest_step() is None
    if algo == "ppo":   # every role's program is in the report
        assert {"rollout", "advantages", "train_step"} <= set(report["programs"])


@pytest.mark.slow  # three runs, each compiling its step
def test_default_layout_that_does_not_fit_falls_back_to_full_remat(paths, tmp_path, caplog):
    """model.remat unset: a step that does not fit in the backend's default layout is compiled
    again with model.remat=full and the run goes on (one warning); a remat the user chose is
    kept, and refused if it does not fit."""
    def need(out, *extra):
        assert _cli("sft", out, paths, "train.steps=2", *extra) == 0
        return json.loads((out / "memory.json").read_text())["preflight"]["need_per_device"]
    default = need(tmp_path / "default", "train.memory_limit_gb=64")
    full = need(tmp_path / "full", "train.memory_limit_gb=64", "model.remat=full")
    assert full < default, (full, default)
    between = f"train.memory_limit_gb={(full + default) / 2 / 2**30:.9f}"
    with caplog.at_level(logging.WARNING):
        assert need(tmp_path / "fallback", between) == full
    assert "model.remat is not set" in caplog.text and "model.remat=full" in caplog.text
    chosen = tmp_path / "chosen"
    assert _cli("sft", chosen, paths, "train.steps=2", between, "model.remat=attn") == 1
    assert not _steps(chosen)


@pytest.mark.slow  # three compiles
def test_bf16_fallback_recomputes_in_scanned_layers(paths, tmp_path, caplog):
    """In bf16 the CPU's default layout runs short rows unrolled, where XLA merges any
    recomputation back: the fallback to model.remat=full runs scanned layers, the very program
    model.remat=full alone compiles (unless model.scan_layers is set)."""
    def run(out, *extra):   # (the tiny config sets scan_layers: null unsets it)
        return _cli("sft", out, paths, "train.steps=2", "model.dtype=bfloat16",
                    "model.scan_layers=null", *extra)
    assert run(tmp_path / "fits", "train.memory_limit_gb=64") == 0
    pre = json.loads((tmp_path / "fits" / "memory.json").read_text())["preflight"]
    resident = sum(pre["resident_per_device"].values())
    # Room for the resident arrays, not for any step: the fallback is tried, then refused.
    tight = f"train.memory_limit_gb={(resident + 1024) / 2**30:.12f}"
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path / "tight", tight) == 1
    assert "model.remat=full in scanned layers" in caplog.text
    assert run(tmp_path / "full", "train.memory_limit_gb=64", "model.remat=full") == 0
    need = lambda out: json.loads((out / "memory.json").read_text())["preflight"]["need_per_device"]
    assert need(tmp_path / "tight") == need(tmp_path / "full")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path / "unrolled", tight, "model.scan_layers=false") == 1
    assert "model.remat=full in unrolled layers" in caplog.text
    assert not _steps(tmp_path / "tight") and not _steps(tmp_path / "unrolled")


@pytest.mark.parametrize("algo", ["sft", "ppo"])
def test_memory_preflight_refuses_before_compiling(paths, tmp_path, capsys, algo):
    """A run whose params and optimizer state alone exceed the device is refused from their
    shapes, before any program of the run is compiled (memory.json holds no program)."""
    out = tmp_path / algo
    error = _refusal(algo, out, paths, capsys, 0.0001)
    assert "the run's resident arrays alone need" in error
    assert "refused before compiling. Try " in error and re.search(r"[0-9.]+ [KM]iB short", error)
    report = json.loads((out / "memory.json").read_text())
    pre = report["preflight"]
    assert pre["fits"] is False and "programs" not in report
    assert pre["limit_per_device"] < pre["need_per_device"] <= sum(pre["resident_per_device"].values())
    assert not _steps(out) and TrainCheckpoints(out).latest_step() is None


# ----------------------------------------------------------------------------- preemption

def _wait_for_steps(p, run_dir: Path, n: int, timeout=600.0):
    deadline = time.time() + timeout
    while len(_steps(run_dir)) < n:
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.time() < deadline, "the run did not log in time"
        time.sleep(0.05)


# One recipe per kind of input the one loop shell runs (rows, pairs, an RL rollout with the
# `rollout` fault point); scripts/faults.py kills every recipe, in larger numbers.
@pytest.mark.slow  # training runs killed and resumed
@pytest.mark.parametrize("algo", ["sft", "dpo", "ppo"])
def test_sigterm_checkpoints_exits_3_and_rerun_continues(paths, tmp_path, algo):
    """SIGTERM from outside once a step is logged (PPO: delivered while iteration 3's rollout
    runs, via the `rollout` fault point) -> a checkpoint of the last finished step, exit 3
    (cli.EXIT_PREEMPTED: not done, so a chain stops)
    within SIGTERM_BOUND_S; rerunning the command continues to the end."""
    out = tmp_path / algo
    supervised = algo in harness.SUPERVISED
    total = 6 if supervised else 4        # shorter than the harness's runs: CI time
    cmd = harness.command(algo, out, paths,
                          f"train.steps={total}" if supervised else f"train.iterations={total}")
    env = harness.child_env(JAXALIGN_FAULT="rollout:3:0:TERM") if algo == "ppo" else \
        harness.child_env()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if algo == "ppo":
        _wait_for_steps(p, out, 2)
        t0 = time.time()
    else:
        _wait_for_steps(p, out, 1)
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    elapsed = time.time() - t0
    assert p.returncode == cli.EXIT_PREEMPTED == 3, err[-3000:]
    assert elapsed < SIGTERM_BOUND_S, elapsed
    assert "received SIGTERM" in err and "rerun the same command to continue" in err
    logged = _steps(out)
    saved = TrainCheckpoints(out).latest_step()
    if algo == "ppo":
        assert "rollout of iteration 3; iteration 2 is checkpointed" in err
        assert saved == 2 and logged == [1, 2]
    else:
        assert saved is not None and saved == logged[-1] < total, (saved, logged)
    r = subprocess.run(cmd, env=harness.child_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at {saved}" in r.stderr
    assert _steps(out) == list(range(1, total + 1))


@pytest.mark.slow  # training runs killed and resumed
@pytest.mark.parametrize("algo", ["sft", "grpo"])
def test_sigterm_before_the_first_step_exits_3_with_nothing_saved(paths, tmp_path, monkeypatch,
                                                                  caplog, algo):
    """SIGTERM as the run starts (SFT: as the first batch is fetched, before the step is
    compiled; GRPO: during the first rollout): the handler installed at load time keeps it,
    the run stops before its first update, exit 3, nothing written to resume from."""
    monkeypatch.setenv(jaxalign_faults.ENV, "batch:1:0:TERM")
    jaxalign_faults.reset()
    out = tmp_path / algo
    try:
        with caplog.at_level(logging.WARNING):
            assert _cli(algo, out, paths) == cli.EXIT_PREEMPTED
    finally:
        monkeypatch.delenv(jaxalign_faults.ENV)
        jaxalign_faults.reset()
    assert "received SIGTERM" in caplog.text
    assert ("before step 1; nothing new to save" if algo == "sft" else
            "during the first rollout; nothing to save") in caplog.text
    assert _steps(out) == [] and TrainCheckpoints(out).latest_step() is None


# ----------------------------------------------------------------------------- harness

@pytest.mark.slow  # training runs killed and resumed
def test_fault_harness_small_count(paths, capsys):
    """scripts/faults.py on PPO: 2 SIGKILLs (during the first data batch, then, as seed 1
    draws it, inside a rollout); each rerun ends identical to the uninterrupted run (metrics,
    samples, final TrainState). Its comparison does see a change."""
    work = paths["model"].parent
    assert harness.main(["--algos", "ppo", "--kills", "2", "--seed", "1",
                         "--work", str(work)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["faults"]["ppo"]
    assert summary["kills"] == summary["recovered"] == summary["identical"] == 2, summary
    assert summary["points"][0] == "batch@1" and summary["points"][1].startswith("rollout@")
    ref = work / "reference" / "ppo"
    tampered = work / "tampered"
    subprocess.run(["cp", "-r", str(ref), str(tampered)], check=True)
    lines = (tampered / "metrics.jsonl").read_text().splitlines()
    row = json.loads(lines[-1])
    row["reward_mean"] += 1e-6
    (tampered / "metrics.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(row)]) + "\n")
    assert harness.same_run(ref, tampered) == (False, "metrics.jsonl differs")
