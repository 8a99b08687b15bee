"""Nothing lost, nothing overwritten that jaxalign did not write (issue 24, findings 1-9, 15
and a full disk): each test reproduces the finding through the CLI on the tiny model and
checks the safe outcome: a one-line error naming the path or key, no traceback, the user's
files untouched, the run resumable."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import faults as harness          # scripts/faults.py (conftest puts scripts/ on sys.path)
from jaxalign import cli, rundir
from jaxalign import faults as jaxalign_faults
from jaxalign.checkpoint import TrainCheckpoints
from jaxalign import manifest

pytestmark = pytest.mark.slow  # runs the CLI end to end, kills and reruns

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.tensorboard=false", "train.progress=false"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return harness.prepare(tmp_path_factory.mktemp("safety"))


def _sft(out, paths, *extra) -> list[str]:
    """The CLI arguments (after `python -m jaxalign.cli`) of a tiny SFT run."""
    return harness.command("sft", out, paths, *extra)[3:]


def _error(capsys) -> str:
    """The one error line of a failed command (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("jaxalign: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _steps(run: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. pipeline

def test_pipeline_refuses_a_stage_dir_it_did_not_create(paths, tmp_path, capsys):
    """Finding 1: `pipeline` used to rmtree an existing OUT/data it never created."""
    out = tmp_path / "P"
    (out / "data").mkdir(parents=True)
    (out / "data" / "precious.txt").write_text("mine")
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(json.dumps({"out_dir": str(out), "model": str(paths["model"]),
                               "data": {"sets": {"sft": {"sources": [str(paths["tasks"] / "train.jsonl")]}}}}))
    assert cli.main(["pipeline", str(cfg)]) == 1
    line = _error(capsys)
    assert str(out / "data") in line and "not written by jaxalign" in line
    assert (out / "data" / "precious.txt").read_text() == "mine"
    assert not (out / "pipeline.json").exists()
    # A stage dir the pipeline made is its own: the same command runs, reruns, replaces it.
    (out / "data" / "precious.txt").unlink()
    assert cli.main(["pipeline", str(cfg)]) == 0
    assert (out / "data" / rundir.OWNER).exists() and (out / "data/sft/train.jsonl").exists()
    assert cli.main(["pipeline", str(cfg), "data.eval_fraction=0.2"]) == 0   # rerun: replaced


# ----------------------------------------------------------------------------- 2. the lock

def test_a_second_run_on_a_running_dir_is_refused(paths, tmp_path, capsys):
    """Finding 2: a second `sft` on the same out_dir resumed under the first, truncated its
    metrics.jsonl and died with an orbax traceback. Now it is refused at once (the holder's
    pid named); the first run goes on; after a SIGKILL of the holder the lock is free."""
    run = tmp_path / "run"
    first = subprocess.Popen(harness.command("sft", run, paths, "train.steps=100000",
                                             "train.save_every=5"),
                             env=harness.child_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists() or len(_steps(run)) < 6:
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.1)
        assert cli.main(_sft(run, paths, "train.steps=100000")) == 1
        line = _error(capsys)
        assert str(run) in line and f"pid {first.pid}" in line
        time.sleep(1.0)
        assert first.poll() is None                 # untouched: still running
        logged = _steps(run)
        assert logged == list(range(1, len(logged) + 1))   # in order, nothing truncated
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead holder's lock: a rerun resumes.
    assert cli.main(_sft(run, paths, f"train.steps={max(_steps(run)) + 2}")) == 0


# ----------------------------------------------------------------------------- 3. retention

def test_keep_one_checkpoint_survives_a_kill_between_save_and_manifest(paths, tmp_path):
    """Finding 3: with keep_checkpoints=1 orbax deleted step 2 inside save(4), before step 4's
    manifest; a kill there left nothing. Now step 2 stays until step 4 is complete."""
    run = tmp_path / "run"
    extra = ("train.steps=6", "train.save_every=2", "train.keep_checkpoints=1")
    r = subprocess.run(harness.command("sft", run, paths, *extra),
                       env=harness.child_env(JAXALIGN_FAULT="manifest:2:0:KILL"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    r = subprocess.run(harness.command("sft", run, paths, *extra), env=harness.child_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stderr and "at 2" in r.stderr and "starts from step 0" not in r.stderr
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == ["6"]


def test_no_complete_checkpoint_says_it_starts_from_0(tmp_path, caplog):
    """Finding 3's log: when nothing complete is left, it says so (not 'the last complete one')."""
    ckpt = tmp_path / "checkpoints"
    manifest.mark_dir(ckpt)
    (ckpt / "4" / "state").mkdir(parents=True)
    (ckpt / "4" / "state" / "blob").write_bytes(b"x" * 100)
    with caplog.at_level("WARNING"):
        c = TrainCheckpoints(tmp_path, set_aside_incomplete=True)
    c.close()
    assert c.latest_step() is None
    assert "no complete checkpoint left; the run starts from step 0" in caplog.text
    assert "last complete one" not in caplog.text


# ----------------------------------------------------------------------------- 4. export / convert

def test_export_replaces_its_own_export_whole(paths, tmp_path):
    """Finding 4: a second export into the same dir left the first one's shards and index."""
    out = tmp_path / "hf"
    assert cli.main(["export", str(paths["model"]), str(out), "--max-shard-gb", "0.0001"]) == 0
    assert (out / "model.safetensors.index.json").exists()
    assert cli.main(["export", str(paths["model"]), str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files and not [f for f in files if "index" in f or "-of-" in f]
    assert not list(tmp_path.glob(".hf.jaxalign-*"))


def test_export_refuses_the_source_and_foreign_dirs(paths, tmp_path, capsys):
    """Finding 4: exporting onto the source replaced its fp32 weights with bf16; a user's
    config.json was overwritten; `convert` deleted OUT/params."""
    model = tmp_path / "model"
    shutil.copytree(paths["model"], model)
    (model / rundir.OWNER).unlink()               # a model jaxalign did not write
    before = _tree(model)
    assert cli.main(["export", str(model), str(model), "--dtype", "bfloat16"]) == 1
    assert "is the source model" in _error(capsys) and _tree(model) == before
    assert cli.main(["export", str(model), str(model / "sub")]) == 1
    assert "is inside the source model" in _error(capsys) and _tree(model) == before

    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text('{"mine": true}')
    assert cli.main(["export", str(model), str(user)]) == 1
    line = _error(capsys)
    assert str(user) in line and "not written by jaxalign" in line
    assert (user / "config.json").read_text() == '{"mine": true}'

    conv = tmp_path / "conv"
    (conv / "params").mkdir(parents=True)
    (conv / "params" / "notes.txt").write_text("mine")
    assert cli.main(["convert", str(model), str(conv)]) == 1
    assert str(conv) in _error(capsys) and (conv / "params" / "notes.txt").read_text() == "mine"
    # Its own earlier output is replaced whole.
    conv2 = tmp_path / "conv2"
    assert cli.main(["convert", str(model), str(conv2)]) == 0
    assert cli.main(["convert", str(model), str(conv2)]) == 0
    assert (conv2 / "jaxalign.json").exists() and (conv2 / "params").is_dir()


# ----------------------------------------------------------------------------- 5. rerun compares

def test_a_rerun_with_another_model_or_lora_is_refused_before_writing(paths, tmp_path, capsys):
    """Finding 5: another model.path of the same shape resumed LoRA adapters onto another
    base; another LoRA setting rewrote run.json / config.yaml before the restore failed,
    leaving the run unexportable."""
    from make_tiny_model import make_tiny_model
    other = make_tiny_model(tmp_path / "other", seed=1)          # same shape, other weights
    run = tmp_path / "run"
    lora = ("lora.rank=4", "lora.alpha=8", "train.steps=2", "train.save_every=2")
    assert cli.main(_sft(run, paths, *lora)) == 0
    capsys.readouterr()
    kept = {n: (run / n).read_bytes() for n in ("run.json", "config.yaml")}
    assert cli.main(_sft(run, paths, *lora, f"model.path={other}", "train.steps=4")) == 1
    line = _error(capsys)
    assert line.startswith("jaxalign: error: model.path:") and str(other) in line
    assert cli.main(_sft(run, paths, *lora[2:], "lora.rank=8", "lora.alpha=8",
                         "train.steps=4")) == 1
    assert _error(capsys).startswith("jaxalign: error: lora.rank:")
    assert kept == {n: (run / n).read_bytes() for n in ("run.json", "config.yaml")}
    assert cli.main(["export", str(run), str(tmp_path / "hf")]) == 0   # still exportable
    # The same model path, rewritten with another config (a changed fingerprint): refused.
    model = tmp_path / "model"
    shutil.copytree(paths["model"], model)
    run2 = tmp_path / "run2"
    assert cli.main(_sft(run2, paths, f"model.path={model}", "train.steps=2")) == 0
    shutil.rmtree(model)
    make_tiny_model(model, layers=3)
    capsys.readouterr()
    assert cli.main(_sft(run2, paths, f"model.path={model}", "train.steps=4")) == 1
    assert "changed since" in _error(capsys)


# ----------------------------------------------------------------------------- 6. pipeline hashes

def test_pipeline_hash_ignores_display_keys_and_mesh_not_dtype(tmp_path):
    """Finding 6: changing sft.train.progress (or --mesh) reran the stage, deleting its
    checkpoints; --dtype changes results and still reruns."""
    from jaxalign.config import from_dict, load_yaml
    from jaxalign.pipeline import PipelineConfig, fingerprints, wire

    def hashes(*over):
        raw = load_yaml(str(ROOT / "configs" / "tiny_pipeline.yaml"), list(over))
        return fingerprints(wire(from_dict(PipelineConfig, raw)))

    base = hashes()
    assert hashes("sft.train.progress=false", "sft.train.log_every=5", "sft.mesh.fsdp=2",
                  "sft.train.save_every=3", "rm.train.keep_checkpoints=1") == base
    assert hashes("sft.model.dtype=bfloat16")[1] != base[1]
    assert hashes("sft.optim.lr=1e-4")[1:] != base[1:] and hashes("sft.optim.lr=1e-4")[0] == base[0]


def test_a_stopped_stage_unmarks_the_stages_after_it(paths, tmp_path, monkeypatch, capsys):
    """Finding 6: a SIGTERM'd stage exited 0 and left the old export marked done (which
    scripts/rlhf.sh then printed as the result). Now: exit 3, later stages not done."""
    out = tmp_path / "P"
    cfg = tmp_path / "pipe.yaml"
    cfg.write_text(json.dumps({
        "out_dir": str(out), "model": str(paths["model"]),
        "sft": {"data": {"train": [str(paths["tasks"] / "train.jsonl")]},
                "train": {"steps": 2, "batch_size": 8, "tensorboard": False, "progress": False}},
        "export": {}}))
    assert cli.main(["pipeline", str(cfg)]) == 0
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert state["export"]["done"] and state["sft"]["done"]
    monkeypatch.setenv(jaxalign_faults.ENV, "step:1:0:TERM")
    jaxalign_faults.reset()
    try:
        assert cli.main(["pipeline", str(cfg), "sft.train.steps=4"]) == cli.EXIT_PREEMPTED == 3
    finally:
        monkeypatch.delenv(jaxalign_faults.ENV)
        jaxalign_faults.reset()
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert not state["sft"]["done"] and not state["export"]["done"]
    assert cli.main(["pipeline", str(cfg), "sft.train.steps=4"]) == 0
    state = json.loads((out / "pipeline.json").read_text())["stages"]
    assert state["sft"]["done"] and state["export"]["done"] and _steps(out / "sft") == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 7, 8. paths

def test_out_dir_overlapping_the_model_is_refused(paths, tmp_path, capsys):
    """Finding 7: out_dir = model.path made the model dir a run whose LoRA base was itself."""
    model = tmp_path / "model"
    shutil.copytree(paths["model"], model)
    before = _tree(model)
    for out, rel in ((model, "is"), (model / "run", "is inside"), (tmp_path, "contains")):
        assert cli.main(_sft(out, paths, f"model.path={model}", "lora.rank=4")) == 1
        assert f"{rel} model.path" in _error(capsys)
    assert _tree(model) == before


def test_prepare_set_names_and_home_in_out_dir(paths, tmp_path, monkeypatch, capsys):
    """Finding 8: a set named `..` wrote outside out_dir; `out_dir: ~/x` made ./~/x."""
    cfg = tmp_path / "prep.yaml"
    src = str(paths["tasks"] / "train.jsonl")
    for name in ("..", ".", "a/b"):
        cfg.write_text(json.dumps({"out_dir": str(tmp_path / "d"), "sets": {name: {"sources": [src]}}}))
        assert cli.main(["prepare", str(cfg)]) == 1
        assert f"sets.{name}: a set name must be a plain file name" in _error(capsys)
    assert not (tmp_path / "d").exists() and not (tmp_path / "train.jsonl").exists()
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    cfg.write_text(json.dumps({"out_dir": "~/x", "sets": {"s": {"sources": [src]}}}))
    assert cli.main(["prepare", str(cfg)]) == 0
    assert (home / "x" / "s" / "train.jsonl").exists() and not (cwd / "~").exists()


# ----------------------------------------------------------------------------- 9. save_every

def test_a_time_based_save_is_on_by_default(paths, tmp_path):
    """Finding 9: save_every defaulted to 0, so a crash lost the whole run. Now a checkpoint
    is written at least every train.save_every_minutes (default 30) of training."""
    from jaxalign.config import TrainConfig
    from jaxalign.train.rl.config import RLTrainConfig
    assert TrainConfig(steps=1, batch_size=1).save_every_minutes == 30.0
    assert RLTrainConfig(iterations=1).save_every_minutes == 30.0
    run = tmp_path / "run"
    assert cli.main(_sft(run, paths, "train.steps=3", "train.save_every=0",
                         "train.save_every_minutes=1e-9", "train.keep_checkpoints=5")) == 0
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3]


# ----------------------------------------------------------------------------- 15. torn files

def test_a_torn_metrics_line_and_an_empty_run_json_do_not_block(paths, tmp_path, caplog):
    """Finding 15: a half-written last line of metrics.jsonl or an empty run.json blocked
    resume and export with a JSONDecodeError."""
    run = tmp_path / "run"
    assert cli.main(_sft(run, paths, "train.steps=2", "train.save_every=2")) == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')          # torn: a kill mid-write
    (run / "run.json").write_text("")
    assert cli.main(["export", str(run), str(tmp_path / "hf0")]) == 1   # one line, not a crash
    with caplog.at_level("WARNING"):
        assert cli.main(_sft(run, paths, "train.steps=4", "train.save_every=2")) == 0
    assert "dropping a torn record" in caplog.text
    assert _steps(run) == [1, 2, 3, 4]
    assert json.loads((run / "run.json").read_text())["format"] == "jaxalign-run"
    assert cli.main(["export", str(run), str(tmp_path / "hf")]) == 0


def test_run_files_are_written_atomically(tmp_path, monkeypatch):
    """A failure in the middle of writing leaves the old file whole (no empty run.json)."""
    path = tmp_path / "run.json"
    rundir.write_atomic(path, '{"a": 1}')

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        rundir.write_atomic(path, '{"a": 2}')
    assert path.read_text() == '{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["run.json"]


# ----------------------------------------------------------------------------- 17. disk full

@pytest.fixture
def small_fs(tmp_path):
    """A 12 MiB tmpfs this test mounts (root only); skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on `mnt`."""
    free = shutil.disk_usage(mnt).free
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_disk_during_a_checkpoint_keeps_the_last_one(paths, small_fs, capsys):
    run = small_fs / "run"
    assert cli.main(_sft(run, paths, "train.steps=2", "train.save_every=2")) == 0
    filler = _fill(small_fs, 200_000)               # less than one checkpoint (~1.2 MB)
    capsys.readouterr()
    assert cli.main(_sft(run, paths, "train.steps=4", "train.save_every=2")) == 1
    line = _error(capsys)
    assert str(run / "checkpoints") in line and "no space left on device" in line
    assert "checkpoint 2 is intact" in line
    c = TrainCheckpoints(run)
    assert c.latest_step() == 2
    c.close()
    filler.unlink()
    assert cli.main(_sft(run, paths, "train.steps=4", "train.save_every=2")) == 0
    assert _steps(run) == [1, 2, 3, 4]


def test_a_full_disk_during_an_export_keeps_the_earlier_export(paths, small_fs, capsys):
    out = small_fs / "hf"
    assert cli.main(["export", str(paths["model"]), str(out)]) == 0
    before = _tree(out)
    filler = _fill(small_fs, 100_000)               # less than the model (~400 KB)
    capsys.readouterr()
    assert cli.main(["export", str(paths["model"]), str(out), "--dtype", "float32"]) == 1
    line = _error(capsys)
    assert str(out) in line and "no space left on device" in line
    assert _tree(out) == before and sorted(p.name for p in small_fs.iterdir()) == ["filler", "hf"]
    filler.unlink()


def test_ownership_reads_older_jaxalign_dirs(tmp_path):
    """Runs and exports written before the markers stay jaxalign's (resumable, re-exportable);
    a directory that merely looks similar is not."""
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"format": "jaxalign-run"}))
    (run / "hf").mkdir()
    (run / "hf" / "config.json").write_text("{}")
    assert rundir.is_owned(run) and rundir.is_owned(run / "hf")
    (run / "run.json").write_text("")                       # torn by a kill: still a run
    assert rundir.is_owned(run)
    user = tmp_path / "user"
    (user / "hf").mkdir(parents=True)
    (user / "hf" / "config.json").write_text("{}")
    (user / "run.json").write_text(json.dumps({"format": "something else"}))
    assert not rundir.is_owned(user) and not rundir.is_owned(user / "hf")
    with pytest.raises(rundir.ForeignDirError, match=str(user / "hf")):
        rundir.claim(user / "hf", "run")
