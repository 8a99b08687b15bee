"""Issue 24's operational findings: the memory pre-flight honours the cgroup limit of a
container or a SLURM --mem job (21), the compile cache and checkpoints.incomplete/ are
bounded (21), exported weights get the user's normal file mode (20)."""

import os
import time
from pathlib import Path

import pytest

import faults as harness          # scripts/faults.py (conftest puts scripts/ on sys.path)
from jaxalign import checkpoint, cli, runtime
from jaxalign.train import preflight

GiB, MiB = 2**30, 2**20


def _cgroup_v2(root: Path, limit: str, current: int, inactive: int = 0) -> Path:
    job = root / "job" / "step"
    job.mkdir(parents=True)
    (root / "memory.max").write_text("max\n")                 # the root: no limit
    (root / "memory.current").write_text("1\n")
    (root / "job" / "memory.max").write_text(limit + "\n")     # the tightest ancestor
    (root / "job" / "memory.current").write_text(f"{current}\n")
    (root / "job" / "memory.stat").write_text(f"anon 5\ninactive_file {inactive}\n")
    (job / "memory.max").write_text("max\n")
    (job / "memory.current").write_text(f"{current}\n")
    proc = root / "proc_cgroup"
    proc.write_text("0::/job/step\n")
    return proc


def test_cgroup_v2_and_v1_limits(tmp_path):
    proc = _cgroup_v2(tmp_path / "v2", str(GiB), 512 * MiB, inactive=128 * MiB)
    room, where = preflight.cgroup_available(tmp_path / "v2", proc)
    assert room == GiB - 512 * MiB + 128 * MiB and where.endswith("job/memory.max")
    v1 = tmp_path / "v1"
    (v1 / "memory" / "slurm").mkdir(parents=True)
    (v1 / "memory" / "slurm" / "memory.limit_in_bytes").write_text(f"{2 * GiB}\n")
    (v1 / "memory" / "slurm" / "memory.usage_in_bytes").write_text(f"{GiB}\n")
    (v1 / "proc").write_text("4:memory:/slurm\n0::/\n")
    assert preflight.cgroup_available(v1, v1 / "proc") == (
        GiB, str(v1 / "memory" / "slurm" / "memory.limit_in_bytes"))
    (v1 / "memory" / "slurm" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")
    assert preflight.cgroup_available(v1, v1 / "proc") is None        # v1's "no limit"


def test_preflight_refuses_past_the_cgroup_limit(tmp_path, capsys, monkeypatch):
    """A run whose cgroup has 64 MiB left while the host has gigabytes free: refused with one
    line naming the cgroup file, where MemAvailable alone would have let it start."""
    paths = harness.prepare(tmp_path / "work")
    monkeypatch.setattr(preflight, "CGROUP_ROOT", tmp_path / "cg")
    monkeypatch.setattr(preflight, "PROC_CGROUP",
                        _cgroup_v2(tmp_path / "cg", str(64 * MiB + 10), 10))
    # Tiny model in fp32: resident ~ MiBs; "+ resident" makes the bar only a bit higher.
    assert cli.main(harness.command("sft", tmp_path / "run", paths, "train.steps=1",
                                    "model.path=" + str(paths["model"]),
                                    "train.batch_size=512")[3:]) == 1
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if l.startswith("jaxalign: error:")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert "memory pre-flight" in line[0] and "job/memory.max" in line[0]


def test_set_aside_checkpoints_are_bounded(tmp_path):
    folder = tmp_path / "checkpoints.incomplete"
    for i in range(6):
        (folder / str(i)).mkdir(parents=True)
        os.utime(folder / str(i), (time.time() - 100 + i, time.time() - 100 + i))
    checkpoint.trim_set_aside(folder, keep=3)
    assert sorted(p.name for p in folder.iterdir()) == ["3", "4", "5"]


def test_compile_cache_is_size_capped(tmp_path):
    """JAXALIGN_COMPILE_CACHE_GB (default 4): least recently used entries go first."""
    assert runtime.compile_cache_bytes({}) == 4 * GiB
    assert runtime.compile_cache_bytes({runtime.COMPILE_CACHE_GB_ENV: "0.5"}) == GiB // 2
    with pytest.raises(SystemExit, match="JAXALIGN_COMPILE_CACHE_GB"):
        runtime.compile_cache_bytes({runtime.COMPILE_CACHE_GB_ENV: "lots"})
    now = time.time()
    # One cap over every host kind's folder (odd entries in one, even in another).
    for i in range(5):
        entry = tmp_path / f"host{i % 2}" / f"prog{i}-cache"
        entry.parent.mkdir(exist_ok=True)
        entry.write_bytes(b"x" * 1000)
        os.utime(entry, (now - 100 + i, now - 100 + i))
    assert runtime.trim_compile_cache(tmp_path, 2500) == 3000
    assert sorted(p.name for p in tmp_path.rglob("*-cache")) == ["prog3-cache", "prog4-cache"]


def test_export_is_written_with_the_users_umask(tmp_path):
    """safetensors creates owner-only files; an export gets 0666 less the umask (0644 under
    the usual 022), like the config and tokenizer files beside it."""
    paths = harness.prepare(tmp_path / "work")
    old = os.umask(0o022)
    try:
        assert cli.main(["export", str(paths["model"]), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
