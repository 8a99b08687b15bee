"""Issue 24's multi-process findings, each on two real processes (1 fake CPU device each,
gloo over loopback): processes with different configs stop at once with one line naming
the process and the key (13); a killed peer, process 1 or process 0 (the coordinator),
makes the survivor exit within JAXALIGN_HEARTBEAT_TIMEOUT with one line naming it and the
rerun resumes identically, while a crash of a process itself is passed through as such; the
coordinator listens on loopback only (16, 20); an unreachable coordinator fails within JAXALIGN_INIT_TIMEOUT
naming the address (16); `prepare` on two processes writes once (16)."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

import faults as harness          # scripts/faults.py (conftest puts scripts/ on sys.path)
from multiproc import free_port, launch, worker_env

pytestmark = pytest.mark.slow  # spawns multi-process runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return harness.prepare(tmp_path_factory.mktemp("mp_safety"))


def _cmd(i: int, port: int, algo: str, out: Path, paths, *extra) -> list[str]:
    cmd = harness.command(algo, out, paths, *extra)
    return cmd[:3] + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                      "--process-id", str(i)] + cmd[3:]


def _env(**extra):
    return worker_env(1, **extra)


def _error_lines(out: str) -> list[str]:
    return [l for l in out.splitlines() if l.startswith("jaxalign: error:")]


def test_processes_with_different_configs_stop_naming_the_key(paths, tmp_path):
    """The reported hang: train.steps differs between the processes. Both exit 1 at start
    with one line naming process 1 and train.steps; no checkpoint is written."""
    port, out = free_port(), tmp_path / "run"
    cmds = [_cmd(0, port, "sft", out, paths, "train.steps=4"),
            _cmd(1, port, "sft", out, paths, "train.steps=5")]
    t0 = time.monotonic()
    outs = launch(cmds, [_env(), _env()], timeout_s=240, returncode=1)
    assert time.monotonic() - t0 < 200
    for o in outs:
        (line,) = _error_lines(o)
        assert "process 1 runs another configuration than process 0: train.steps is 5 " \
               "there and 4 on process 0" in line, o[-2000:]
        assert "Traceback" not in o and "Check failure" not in o
    assert not (out / "checkpoints").exists()


def _listening(port: int) -> list[str]:
    """Local addresses listening on `port` (/proc/net/tcp and tcp6, state 0A)."""
    found = []
    for name in ("tcp", "tcp6"):
        f = Path("/proc/net") / name
        if not f.exists():
            continue
        for row in f.read_text().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            addr, p = local.split(":")
            if int(p, 16) == port and state == "0A":
                found.append(f"{name}:{addr}")
    return found


def test_killed_peer_stops_the_survivor_with_one_line(paths, tmp_path):
    """Process 1 is SIGKILLed mid-run: process 0 exits 1 within the 5 s heartbeat timeout
    (plus the polling), with one line naming process 1, and no C++ abort trace. While both
    run, the coordinator listens on 127.0.0.1 only, not on every interface."""
    port, out = free_port(), tmp_path / "run"
    env = _env(JAXALIGN_HEARTBEAT_TIMEOUT="5")
    cmds = [_cmd(i, port, "sft", out, paths, "train.steps=400", "train.save_every=2")
            for i in range(2)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=str(ROOT)) for c in cmds]
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, "no step done"
            time.sleep(0.5)
        listening = _listening(port)
        loopback = {"tcp:0100007F", "tcp6:0000000000000000FFFF00000100007F",   # 127.0.0.1
                    "tcp6:00000000000000000000000001000000"}                   # ::1
        assert listening and set(listening) <= loopback, listening   # never [::] or 0.0.0.0
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        o, _ = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, o[-3000:]
    assert took < 5 + 15, took
    lines = _error_lines(o)
    assert len(lines) == 1, o[-4000:]
    line = lines[0]
    assert "process 1 of 2 stopped responding" in line and "JAXALIGN_HEARTBEAT_TIMEOUT" in line
    assert "Check failure" not in o and "Traceback" not in o


NATIVE_ABORT = ("Traceback", "Check failure", "F0000", "*** SIGABRT", "Terminating process",
                "@     0x")


def _start(cmds, env) -> list[subprocess.Popen]:
    return [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=str(ROOT)) for c in cmds]


def _wait_steps(out: Path, procs, n: int) -> None:
    deadline, metrics = time.monotonic() + 300, out / "metrics.jsonl"
    while not metrics.exists() or len(metrics.read_text().splitlines()) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            f"{n} steps not done"
        time.sleep(0.1)


def test_killed_coordinator_stops_the_survivor_with_one_line_and_resumes(paths, tmp_path):
    """Process 0 (it hosts JAX's coordination service) is SIGKILLed mid-run, after its
    first checkpoint. JAX's client in process 1 aborts from C++ at once; the command the
    user started (its supervising parent, jaxalign/supervise.py) turns that into exit 1
    within the timeout and ONE stderr line naming process 0, with no native trace. The same
    two commands rerun resume and end with the metrics and final state of a run that was
    never interrupted."""
    extra = ("train.steps=30", "train.save_every=3")
    ref, out = tmp_path / "ref", tmp_path / "run"
    port = free_port()
    launch([_cmd(i, port, "sft", ref, paths, *extra) for i in range(2)], [_env(), _env()],
           timeout_s=600)
    port = free_port()
    procs = _start([_cmd(i, port, "sft", out, paths, *extra) for i in range(2)],
                   _env(JAXALIGN_HEARTBEAT_TIMEOUT="5"))
    try:
        _wait_steps(out, procs, 4)             # step 3 saved
        procs[0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = procs[1].communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert procs[1].returncode == 1, err[-3000:]
    assert took < 5 + 15, took
    lines = err.splitlines()
    assert len(_error_lines(err)) == 1, err[-4000:]
    assert "jaxalign: error: process 0 of 2 (the coordinator, 127.0.0.1:" in err, err[-4000:]
    assert "Rerun the same command on every process" in err
    assert not any(m in err for m in NATIVE_ABORT), err[-4000:]
    assert lines[-1].startswith("jaxalign: error:"), lines[-5:]   # nothing after it
    assert len(out.joinpath("metrics.jsonl").read_text().splitlines()) < 30
    port = free_port()
    launch([_cmd(i, port, "sft", out, paths, *extra) for i in range(2)], [_env(), _env()],
           timeout_s=600)
    same, why = harness.same_run(ref, out)
    assert same, why


def test_own_crash_is_reported_as_such_not_as_a_lost_peer(paths, tmp_path):
    """Process 1's worker itself aborts (SIGABRT) while the coordinator lives: its command
    ends by the same signal (not exit 1 blaming process 0), and process 0 names process 1
    in one line."""
    port, out = free_port(), tmp_path / "run"
    procs = _start([_cmd(i, port, "sft", out, paths, "train.steps=400") for i in range(2)],
                   _env(JAXALIGN_HEARTBEAT_TIMEOUT="5"))
    try:
        _wait_steps(out, procs, 1)
        pid = procs[1].pid
        (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        subprocess.run(["kill", "-ABRT", child], check=True)
        _, err1 = procs[1].communicate(timeout=60)
        _, err0 = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -signal.SIGABRT, err1[-3000:]
    assert "process 0 of 2" not in err1
    assert procs[0].returncode == 1, err0[-3000:]
    (line,) = _error_lines(err0)
    assert "process 1 of 2 stopped responding" in line


def test_unreachable_coordinator_fails_within_the_timeout(paths, tmp_path):
    port = free_port()            # nobody listens there
    cmd = _cmd(1, port, "sft", tmp_path / "run", paths)
    t0 = time.monotonic()
    r = subprocess.run(cmd, env=_env(JAXALIGN_INIT_TIMEOUT="3"), capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT))
    assert r.returncode == 1 and time.monotonic() - t0 < 60, r.stderr[-2000:]
    (line,) = _error_lines(r.stderr)
    assert f"the coordinator 127.0.0.1:{port} did not answer within 3 s" in line
    assert "Check failure" not in r.stderr and "Traceback" not in r.stderr


def test_prepare_on_two_processes_writes_once(paths, tmp_path):
    cfg = tmp_path / "data.yaml"
    cfg.write_text(json.dumps({"out_dir": str(tmp_path / "data"),
                               "sets": {"sft": {"sources": [str(paths["tasks"] / "train.jsonl")]}},
                               "eval_fraction": 0.1}))
    port = free_port()
    cmds = [harness.command("sft", tmp_path, paths)[:3] +
            ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
             str(i), "prepare", str(cfg)] for i in range(2)]
    outs = launch(cmds, [_env(), _env()], timeout_s=240)
    totals = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    assert totals[0] == totals[1] and totals[0]["kept"] > 0, outs
    assert (tmp_path / "data" / "sft" / "train.jsonl").exists()
    assert not list((tmp_path / "data").rglob("*scratch*"))
