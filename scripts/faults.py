"""Fault-injection harness: kill real training runs at random moments, rerun them, and check
that they end exactly where an uninterrupted run ends.

  python scripts/faults.py [--algos sft,rm,dpo,kto,ppo,grpo] [--kills N] [--seed S]
                           [--work DIR] [--jobs J] [--peer-kills N]

Per algorithm: one uninterrupted reference run of a tiny config, then N trials. A trial
starts a fresh run (`python -m jaxalign.cli ...`, a real process) that is SIGKILLed at a
random moment, reruns the same command to the end, and compares its metrics.jsonl (and
samples.jsonl for RL) byte for byte and its final checkpoint's TrainState (params, optimizer
moments, step, RNG) bit for bit with the reference. The moments, drawn in turn:

  batch       right after a data batch / the prompts are fetched (batch 1: the first one)
  step        while an optimizer step runs (dispatched, not finished)
  checkpoint  0-50 ms into a checkpoint write (orbax files being written)
  manifest    orbax files written, integrity manifest not yet (a half-written checkpoint)
  rollout     while an RL rollout runs
  timed       SIGKILL from outside after a random delay within the reference run's length

--peer-kills N adds N two-process SFT runs (1 CPU device each) in which one process is
SIGKILLed, process 1 and process 0 (the coordinator) in turn: the survivor must exit within
JAXALIGN_HEARTBEAT_TIMEOUT with one line naming it and no native abort trace, and rerunning
both must end identical to an uninterrupted two-process run.

The in-process ones use jaxalign's fault points (`jaxalign/faults.py`, env JAXALIGN_FAULT)
with a random occurrence number. Prints a table (kills, recovered, identical) and one JSON
line; exits 1 unless every trial that was killed recovered identically.

  python scripts/faults.py --safety [--work DIR]

runs the data-safety cases instead (SFT, tiny), each checked against an uninterrupted run:
  retention   keep_checkpoints=1, SIGKILL after orbax wrote the new step and before its
              manifest: the previous step must still be there and the rerun resume from it
  concurrent  a second run on the same out_dir while the first runs: refused (exit 1, one
              line naming the holder's pid); the first ends identical to the reference
  disk_full   the run dir on a small file system this script makes (a tmpfs mount, else an
              ext4 image on a loop device; both need root), filled before the second save:
              exit 1, one line naming the path, the previous checkpoint intact; with space
              freed the rerun ends identical to the reference. Without root it falls back to
              RLIMIT_FSIZE (the writes past the limit fail with EFBIG) and says so.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUPERVISED = ("sft", "rm", "dpo", "kto")
ALGOS = (*SUPERVISED, "ppo", "grpo")
STEPS, SAVE_EVERY = 12, 3          # supervised steps / RL iterations: 8, saved every 2
RL_ITERS, RL_SAVE, RL_EPOCHS = 8, 2, 2
# GRPO at its default of one minibatch: the old log-probs come from each rollout's first step.
RL_MINIBATCHES = {"ppo": 2, "grpo": 1}


def prepare(work: Path) -> dict[str, Path]:
    """The tiny model and the synthetic data sets every run reads (made once per work dir)."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {"model": work / "model", "tasks": work / "tasks", "prefs": work / "prefs",
             "unpaired": work / "prefs_unpaired"}
    if not (paths["model"] / "config.json").exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        from make_tiny_model import make_tiny_model
        make_tiny_model(paths["model"])
    py = [sys.executable, "-m"]
    env = child_env()
    for key, mod, extra in (("tasks", "jaxalign.synth.tasks", ["--train", "300", "--eval", "40"]),
                            ("prefs", "jaxalign.synth.prefs", ["--train", "256", "--eval", "32"]),
                            ("unpaired", "jaxalign.synth.prefs",
                             ["--train", "256", "--eval", "32", "--unpaired"])):
        if not (paths[key] / "train.jsonl").exists():
            subprocess.run([*py, mod, str(paths[key]), *extra], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return paths


def child_env(**extra) -> dict[str, str]:
    # One device per run; a codegen level the caller set (the test suite's) carries over.
    level = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if f.startswith("--xla_backend_optimization_level")]
    env = dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=1", *level]),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("JAXALIGN_FAULT", None)
    env.update(extra)
    return env


def command(algo: str, out_dir: Path, paths: dict[str, Path], *extra: str) -> list[str]:
    """The CLI command of a tiny run of `algo` writing to `out_dir`."""
    common = [f"out_dir={out_dir}", f"model.path={paths['model']}", "train.tensorboard=false",
              "train.progress=false"]
    if algo in SUPERVISED:
        data = {"sft": "tasks", "rm": "prefs", "dpo": "prefs", "kto": "unpaired"}[algo]
        over = [f"data.train=[{{path: {paths[data] / 'train.jsonl'}}}]",
                f"train.steps={STEPS}", f"train.save_every={SAVE_EVERY}", "train.log_every=1",
                "train.export_hf=false"]
        if algo != "sft":
            over += [f"data.eval=[{{path: {paths[data] / 'eval.jsonl'}}}]", "train.eval_every=6",
                     "train.batch_size=8"]
        cmd = [algo, str(ROOT / "configs" / f"tiny_{algo}.yaml")]
    else:
        over = [f"data.prompts={paths['tasks'] / 'train.jsonl'}", f"train.iterations={RL_ITERS}",
                f"train.save_every={RL_SAVE}", "train.sample_every=2",
                f"ppo.epochs={RL_EPOCHS}", f"ppo.minibatches={RL_MINIBATCHES[algo]}"]
        if algo == "grpo":
            over += ["algorithm=grpo", "rollout.batch_size=4", "rollout.num_generations=4"]
        cmd = ["ppo", str(ROOT / "configs" / "tiny_ppo.yaml")]
    return [sys.executable, "-m", "jaxalign.cli", *cmd, *common, *over, *extra]


def points(algo: str) -> list[tuple[str, int]]:
    """(fault point, how many times a whole run reaches it) for `algo`."""
    if algo in SUPERVISED:
        return [("batch", STEPS), ("step", STEPS), ("checkpoint", STEPS // SAVE_EVERY),
                ("manifest", STEPS // SAVE_EVERY), ("timed", 0)]
    steps = RL_ITERS * RL_EPOCHS * RL_MINIBATCHES[algo]
    return [("batch", RL_ITERS), ("rollout", RL_ITERS), ("step", steps),
            ("checkpoint", RL_ITERS // RL_SAVE), ("manifest", RL_ITERS // RL_SAVE), ("timed", 0)]


def final_state(run_dir: Path) -> dict:
    """The newest complete checkpoint's TrainState as flat {path: numpy array}."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jaxalign.checkpoint import TrainCheckpoints

    ckpts = TrainCheckpoints(run_dir)
    step = ckpts.latest_step()
    ckpts.close()
    path = Path(run_dir).absolute() / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as reader:
        # As numpy: a checkpoint of a multi-process run names shardings on devices that
        # this one process does not have.
        meta = reader.metadata(path)
        meta = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]} | {"<step>": step}


def same_run(a: Path, b: Path) -> tuple[bool, str]:
    """(identical, why not): metrics.jsonl / samples.jsonl bytes and the final TrainState."""
    import numpy as np
    for name in ("metrics.jsonl", "samples.jsonl"):
        fa, fb = a / name, b / name
        if fa.exists() != fb.exists() or (fa.exists() and fa.read_bytes() != fb.read_bytes()):
            return False, f"{name} differs"
    sa, sb = final_state(a), final_state(b)
    if sa.keys() != sb.keys():
        return False, "the final checkpoints hold different trees"
    for k in sa:
        if not np.array_equal(sa[k], sb[k]):
            return False, f"final state {k} differs"
    return True, ""


def run_to_end(cmd, env, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def trial(algo: str, k: int, point: str, n: int, delay: float, paths, work: Path) -> dict:
    out = work / "trials" / f"{algo}-{k}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = command(algo, out, paths)
    t0 = time.time()
    if point == "timed":
        # The delay is drawn within the reference run's length, which includes a cold
        # compile; a rerun with a warm compilation cache may finish first. Then the trial
        # starts over with half the delay, so that every trial is a real kill.
        for _ in range(6):
            shutil.rmtree(out, ignore_errors=True)
            p = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
            err = p.communicate()[1]
            rc = p.returncode
            if rc != 0:
                break
            delay /= 2
    else:
        fault = f"{point}:{n}:{delay:.3f}:KILL"
        r = run_to_end(cmd, child_env(JAXALIGN_FAULT=fault))
        rc, err = r.returncode, r.stderr
    killed = rc == -signal.SIGKILL
    result = {"algo": algo, "point": point, "n": n, "delay": round(delay, 3), "killed": killed,
              "kill_rc": rc, "kill_s": round(time.time() - t0, 1)}
    if not killed and rc != 0:
        result.update(recovered=False, identical=False, why=err[-500:])
        return result
    r = run_to_end(cmd, child_env())
    result["recovered"] = r.returncode == 0
    result["skipped_incomplete"] = "skipping checkpoint" in r.stderr
    if not result["recovered"]:
        result.update(identical=False, why=r.stderr[-500:])
        return result
    same, why = same_run(work / "reference" / algo, out)
    result.update(identical=same, why=why)
    return result


# ----------------------------------------------------------------------------- data safety

def _one_error_line(stderr: str) -> str | None:
    lines = [l for l in stderr.splitlines() if l.startswith("jaxalign: error: ")]
    return lines[0] if len(lines) == 1 and "Traceback" not in stderr else None


def _steps_saved(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def safety_retention(paths, work: Path, ref: Path) -> dict:
    run = work / "safety" / "retention"
    extra = ("train.keep_checkpoints=1",)
    r = run_to_end(command("sft", run, paths, *extra),
                   child_env(JAXALIGN_FAULT="manifest:2:0:KILL"))
    kept = _steps_saved(run)
    r2 = run_to_end(command("sft", run, paths, *extra), child_env())
    same, why = same_run(ref, run) if r2.returncode == 0 else (False, r2.stderr[-500:])
    ok = (r.returncode == -signal.SIGKILL and kept == [SAVE_EVERY, 2 * SAVE_EVERY]
          and f"at {SAVE_EVERY}" in r2.stderr and same and _steps_saved(run) == [STEPS])
    return {"case": "retention", "ok": ok, "kill_rc": r.returncode, "steps_on_disk": kept,
            "resumed_at": SAVE_EVERY if f"at {SAVE_EVERY}" in r2.stderr else None,
            "identical": same, "why": why}


def safety_concurrent(paths, work: Path, ref: Path) -> dict:
    run = work / "safety" / "concurrent"
    # The first run stops itself (SIGSTOP) after its 5th step, so that the second surely
    # meets it mid-run however slow the machine; SIGCONT lets it finish afterwards.
    first = subprocess.Popen(command("sft", run, paths),
                             env=child_env(JAXALIGN_FAULT="batch:6:0:STOP"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while first.poll() is None and time.time() < deadline and \
            Path(f"/proc/{first.pid}/stat").read_text().split(") ")[1][0] != "T":
        time.sleep(0.05)
    second = run_to_end(command("sft", run, paths), child_env())
    running = first.poll() is None
    first.send_signal(signal.SIGCONT)
    first_err = first.communicate(timeout=900)[1]
    line = _one_error_line(second.stderr)
    same, why = same_run(ref, run) if first.returncode == 0 else (False, first_err[-500:])
    ok = (running and second.returncode == 1 and line is not None
          and f"pid {first.pid}" in line and same)
    return {"case": "concurrent", "ok": ok, "first_running_during_second": running,
            "second_rc": second.returncode, "second_error": line, "first_rc": first.returncode,
            "identical": same, "why": why}


def _small_fs(mnt: Path, size_mb: int):
    """Mounts a size_mb file system at `mnt`: (how, undo) or (None, reason)."""
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode == 0:
        return "tmpfs", lambda: subprocess.run(["umount", "-l", str(mnt)], check=False)
    image = mnt.with_suffix(".img")
    steps = [["truncate", "-s", f"{size_mb}M", str(image)],
             ["mkfs.ext4", "-q", "-F", str(image)],
             ["mount", "-o", "loop", str(image), str(mnt)]]
    for cmd in steps:
        r2 = subprocess.run(cmd, capture_output=True, text=True)
        if r2.returncode != 0:
            return None, f"tmpfs: {r.stderr.strip()}; ext4 image: {r2.stderr.strip()}"
    return "ext4 loop image", lambda: subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(mnt).free - leave))
    return filler


def safety_disk_full(paths, work: Path, ref: Path) -> dict:
    mnt = work / "safety" / "smallfs"
    how, undo = _small_fs(mnt, 16)
    if how is None:
        return safety_disk_full_rlimit(paths, work, ref, reason=undo)
    try:
        run = mnt / "run"
        first = run_to_end(command("sft", run, paths, f"train.steps={SAVE_EVERY}"), child_env())
        filler = _fill(mnt, 200_000)        # less than one checkpoint of the tiny model
        full = run_to_end(command("sft", run, paths), child_env())
        line = _one_error_line(full.stderr)
        kept = _steps_saved(run)
        filler.unlink()
        r = run_to_end(command("sft", run, paths), child_env())
        same, why = same_run(ref, run) if r.returncode == 0 else (False, r.stderr[-500:])
        if line is None:
            why = "not one error line:\n" + "\n".join(
                l for l in full.stderr.splitlines() if " INFO " not in l)[-1500:]
        ok = (first.returncode == 0 and full.returncode == 1 and line is not None
              and "no space left on device" in line and str(run / "checkpoints") in line
              and kept == [SAVE_EVERY] and same)
        return {"case": "disk_full", "ok": ok, "filesystem": how, "full_rc": full.returncode,
                "full_error": line, "steps_on_disk_after": kept, "identical": same, "why": why}
    finally:
        undo()


def safety_disk_full_rlimit(paths, work: Path, ref: Path, reason: str) -> dict:
    print(f"disk_full: no small file system could be mounted ({reason}); falling back to "
          f"RLIMIT_FSIZE (writes past 300 KB fail with EFBIG)", file=sys.stderr)
    import resource
    run = work / "safety" / "disk_full_rlimit"
    shutil.rmtree(run, ignore_errors=True)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    first = run_to_end(command("sft", run, paths, f"train.steps={SAVE_EVERY}"), child_env())
    full = subprocess.run(command("sft", run, paths), env=child_env(), capture_output=True,
                          text=True, timeout=900, preexec_fn=limit)
    line = _one_error_line(full.stderr)
    kept = _steps_saved(run)
    r = run_to_end(command("sft", run, paths), child_env())
    same, why = same_run(ref, run) if r.returncode == 0 else (False, r.stderr[-500:])
    ok = first.returncode == 0 and full.returncode == 1 and line is not None and \
        kept == [SAVE_EVERY] and same
    return {"case": "disk_full", "ok": ok, "filesystem": "RLIMIT_FSIZE (fallback)",
            "full_rc": full.returncode, "full_error": line, "steps_on_disk_after": kept,
            "identical": same, "why": why}


def main_safety(work: Path) -> int:
    paths = prepare(work)
    ref = work / "reference" / "sft"
    shutil.rmtree(ref, ignore_errors=True)
    shutil.rmtree(work / "safety", ignore_errors=True)
    r = run_to_end(command("sft", ref, paths), child_env())
    if r.returncode != 0:
        print(f"sft: the reference run failed:\n{r.stderr[-2000:]}", file=sys.stderr)
        return 1
    results = [case(paths, work, ref) for case in
               (safety_retention, safety_concurrent, safety_disk_full)]
    print(f"{'case':<12}{'ok':>4}  detail")
    for res in results:
        detail = {k: v for k, v in res.items() if k not in ("case", "ok", "why")}
        print(f"{res['case']:<12}{'yes' if res['ok'] else 'NO':>4}  {json.dumps(detail)}")
        if not res["ok"]:
            print(f"FAILED {res['case']}: {res.get('why', '')}", file=sys.stderr)
    print(json.dumps({"safety": results}))
    return 0 if all(res["ok"] for res in results) else 1
# ----------------------------------------------------------------------------- peer kills

PEER_TIMEOUT_S = 5   # JAXALIGN_HEARTBEAT_TIMEOUT of the peer-kill trials
PEER_STEPS = 40      # long enough that the kill lands mid-run on a slow machine
# What a native abort leaves on stderr (glog's fatal line, the failure signal handler's dump).
NATIVE_ABORT = ("Traceback", "Check failure", "F0000", "*** SIGABRT", "Terminating process")


def _two_process(out: Path, paths, port: int) -> list[list[str]]:
    cmd = command("sft", out, paths, f"train.steps={PEER_STEPS}")
    return [cmd[:3] + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                       "--process-id", str(i)] + cmd[3:] for i in range(2)]


def _run_both(cmds, env, timeout=900) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for c in cmds]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout), "", p.communicate()[1])
            for p in procs]


def peer_kill_trial(k: int, victim: int, delay: float, paths, work: Path) -> dict:
    """A 2-process SFT run; process `victim` SIGKILLed `delay` s after its first logged step.
    The survivor must exit 1 within PEER_TIMEOUT_S (+ polling) with one line naming the
    victim (`one_line`), and the same two commands rerun must end identical to an
    uninterrupted 2-process run."""
    import socket
    out = work / "peer_trials" / f"sft-{k}"
    shutil.rmtree(out, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = child_env(JAXALIGN_HEARTBEAT_TIMEOUT=str(PEER_TIMEOUT_S), JAXALIGN_ALLOCATOR="system")
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for c in _two_process(out, paths, port)]
    metrics, deadline = out / "metrics.jsonl", time.time() + 600
    while (not metrics.exists() or not metrics.read_text().strip()) and time.time() < deadline \
            and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    time.sleep(delay)
    procs[victim].send_signal(signal.SIGKILL)
    t_kill = time.time()
    survivor = procs[1 - victim]
    try:
        err = survivor.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        survivor.kill()
        err = survivor.communicate()[1] + "\n(survivor killed after 120 s)"
    exit_s = time.time() - t_kill
    procs[victim].wait()
    lines = [l for l in err.splitlines() if l.startswith("jaxalign: error:")]
    result = {"k": k, "victim": victim, "delay": round(delay, 2),
              "survivor_rc": survivor.returncode, "survivor_exit_s": round(exit_s, 1),
              "one_line": len(lines) == 1 and f"process {victim} of 2" in lines[0]
              and not any(m in err for m in NATIVE_ABORT),
              "line": lines[0] if lines else err.strip().splitlines()[-1:]}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rs = _run_both(_two_process(out, paths, port), child_env(JAXALIGN_ALLOCATOR="system"))
    result["recovered"] = all(r.returncode == 0 for r in rs)
    same, why = same_run(work / "reference" / "sft-2proc", out) if result["recovered"] \
        else (False, rs[0].stderr[-300:])
    result.update(identical=same, why=why)
    return result


def peer_kills(n: int, seed: int, paths, work: Path) -> dict:
    import socket
    rng = random.Random(seed)
    ref = work / "reference" / "sft-2proc"
    shutil.rmtree(ref, ignore_errors=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    rs = _run_both(_two_process(ref, paths, port), child_env(JAXALIGN_ALLOCATOR="system"))
    if any(r.returncode for r in rs):
        raise SystemExit(f"the 2-process reference run failed:\n{rs[0].stderr[-2000:]}")
    span = time.time() - t0
    # Process 1 first (the usual case: a worker dies), then process 0, which hosts the
    # coordination service (the survivor's supervising parent names it), alternating.
    trials = [peer_kill_trial(k, 1 - k % 2, rng.uniform(0.0, 2.0), paths, work)
              for k in range(n)]
    print(f"{'victim':<8}{'survivor rc':>12}{'exit s':>8}{'one line':>10}{'recovered':>11}"
          f"{'identical':>11}")
    for t in trials:
        print(f"{t['victim']:<8}{t['survivor_rc']:>12}{t['survivor_exit_s']:>8}"
              f"{str(t['one_line']):>10}{str(t['recovered']):>11}{str(t['identical']):>11}")
    return {"trials": trials, "reference_s": round(span, 1), "peer_timeout_s": PEER_TIMEOUT_S}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algos", default=",".join(ALGOS))
    ap.add_argument("--kills", type=int, default=3, help="kills per algorithm (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "faults")
    ap.add_argument("--jobs", type=int, default=1, help="trials run side by side")
    ap.add_argument("--safety", action="store_true",
                    help="run the data-safety cases (retention window, concurrent run, full "
                         "disk) instead of the random kills")
    ap.add_argument("--peer-kills", type=int, default=0,
                    help="also: 2-process SFT runs with one process SIGKILLed (default 0)")
    args = ap.parse_args(argv)
    if args.safety:
        return main_safety(args.work)
    algos = [a for a in args.algos.split(",") if a]
    bad = [a for a in algos if a not in ALGOS]
    if bad or args.kills < 0:
        ap.error(f"unknown algorithm(s) {bad}; expected some of {','.join(ALGOS)}"
                 if bad else "--kills must be >= 0")
    paths = prepare(args.work)
    rng = random.Random(args.seed)
    durations, jobs = {}, []
    for algo in algos:
        ref = args.work / "reference" / algo
        shutil.rmtree(ref, ignore_errors=True)
        t0 = time.time()
        r = run_to_end(command(algo, ref, paths), child_env())
        if r.returncode != 0:
            print(f"{algo}: the reference run failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        durations[algo] = time.time() - t0
        kinds = rng.sample(points(algo), len(points(algo)))  # every kind in turn, random order
        for k in range(args.kills):
            # The first trial dies on the first data batch; the others cycle through the kinds.
            point, hits = kinds[(k - 1) % len(kinds)] if k else ("batch", 1)
            n = rng.randint(1, hits) if hits else 0
            if point == "timed":
                delay = rng.uniform(0.3, 1.0) * durations[algo]
            elif point == "checkpoint":
                delay = rng.uniform(0.0, 0.05)
            else:
                delay = 0.0
            jobs.append((algo, k, point, n, delay))
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = list(pool.map(lambda j: trial(*j, paths, args.work), jobs))
    summary = {}
    print(f"{'algorithm':<10}{'kills':>7}{'recovered':>11}{'identical':>11}  points")
    for algo in algos:
        rs = [r for r in results if r["algo"] == algo]
        killed = [r for r in rs if r["killed"]]
        row = {"trials": len(rs), "kills": len(killed),
               "recovered": sum(r["recovered"] for r in killed),
               "identical": sum(r["identical"] for r in killed),
               "skipped_incomplete": sum(r.get("skipped_incomplete", False) for r in killed),
               "not_killed_but_identical": sum(r["identical"] for r in rs if not r["killed"]),
               "points": [f"{r['point']}@{r['n']}" for r in killed]}
        summary[algo] = row
        print(f"{algo:<10}{row['kills']:>7}{row['recovered']:>11}{row['identical']:>11}  "
              f"{' '.join(row['points'])}")
    for r in results:
        if r["killed"] and not r["identical"] or not r["killed"] and r["kill_rc"] != 0:
            print(f"FAILED {r['algo']} {r['point']}@{r['n']}: {r.get('why', '')}", file=sys.stderr)
    peers = peer_kills(args.peer_kills, args.seed, paths, args.work) if args.peer_kills else None
    print(json.dumps({"faults": summary, "seed": args.seed, "kills_per_algorithm": args.kills,
                      **({"peer_kills": peers} if peers else {})}))
    ok = all(s["identical"] == s["kills"] for s in summary.values()) and \
        all(r["killed"] or r["kill_rc"] == 0 for r in results) and \
        all(t["recovered"] and t["identical"] for t in (peers or {}).get("trials", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
