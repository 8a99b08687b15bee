"""Plumbing of scripts/bench.py: child processes and their peak RSS, allocators, the machine,
the table. No jax / torch import here: the driver process stays small and neutral."""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Where a preloadable allocator may live: Debian packages, then the PyPI wheel cmeel-mimalloc.
ALLOCATORS = {
    "jemalloc": ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"],
    "mimalloc": ["/usr/lib/x86_64-linux-gnu/libmimalloc.so.2", "/usr/lib/aarch64-linux-gnu/libmimalloc.so.2",
                 f"{sys.prefix}/lib/python3*/site-packages/cmeel.prefix/lib/libmimalloc.so*"],
}
# The allocator settings of a preloaded row (memory kept, not returned to the OS). mimalloc's are
# the CLI's own (jaxalign/runtime.py MIMALLOC_ENV, copied here so that this driver imports no
# jaxalign; tests/test_bench.py checks they agree), so "best TRL" runs on what our CLI runs on.
ALLOCATOR_ENV = {"jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
                 "mimalloc": {"MIMALLOC_PURGE_DELAY": "3153600000",
                              "MIMALLOC_ARENA_MAX_OBJECT_SIZE": "1TiB"}}
_ALLOC_VARS = ("LD_PRELOAD", "MALLOC_CONF", "MIMALLOC_PURGE_DELAY", "MIMALLOC_ARENA_MAX_OBJECT_SIZE",
               "JAXALIGN_ALLOCATOR", "JAXALIGN_ALLOCATOR_PRELOADED")


def find_allocator(name: str) -> str | None:
    for pattern in ALLOCATORS.get(name, ()):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[0]
    return None


def child_env(allocator: str) -> dict | None:
    """The environment of a row: the user's, minus any inherited allocator setting ('default':
    the jaxalign CLI then preloads its own mimalloc, jaxalign/runtime.py; torch gets glibc),
    'system' (glibc on both sides: JAXALIGN_ALLOCATOR=system), or with an allocator preloaded
    for both sides. None when that allocator is not installed here."""
    env = {k: v for k, v in os.environ.items() if k not in _ALLOC_VARS}
    if allocator == "default":
        return env
    if allocator == "system":
        return dict(env, JAXALIGN_ALLOCATOR="system")
    lib = find_allocator(allocator)
    if lib is None:
        return None
    return dict(env, LD_PRELOAD=lib, **ALLOCATOR_ENV[allocator])


class _GpuPoll(threading.Thread):
    """The largest device memory nvidia-smi reports for one process (what it holds: for JAX,
    its preallocated pool unless XLA_PYTHON_CLIENT_PREALLOCATE=false), every 0.5 s."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self.done = pid, None, threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            try:
                text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                       "--format=csv,noheader,nounits"], capture_output=True,
                                      text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in text.splitlines():
                pid, _, mib = line.partition(",")
                if pid.strip() == str(self.pid) and mib.strip().isdigit():
                    self.peak_mib = max(self.peak_mib or 0, int(mib))


def run_child(argv: list[str], env: dict, cwd: str | None = None, label: str = "",
              verbose: bool = False) -> dict:
    """Runs one row's process to its end. -> rc, stdout, stderr, peak RSS (GiB: the child's
    ru_maxrss from wait4, i.e. its largest resident set, all threads), its peak device memory
    per nvidia-smi (GiB, None without a GPU), wall seconds."""
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=None if verbose else err, env=env, cwd=cwd)
        poll = _GpuPoll(proc.pid) if shutil.which("nvidia-smi") else None
        if poll:
            poll.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        if poll:
            poll.done.set()
            poll.join()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    rss = usage.ru_maxrss / 2**20  # KiB on Linux
    print(f"[bench] {label}: exit {proc.returncode}, {wall:.0f} s wall, peak RSS {rss:.2f} GiB",
          file=sys.stderr, flush=True)
    if proc.returncode != 0:
        print("\n".join(stderr.splitlines()[-40:]), file=sys.stderr)
    dev = poll.peak_mib / 1024 if poll and poll.peak_mib is not None else None
    return dict(rc=proc.returncode, stdout=stdout, stderr=stderr, peak_rss_gib=rss, smi_dev_gib=dev, wall_s=wall)


def worker_argv(job_file: str) -> list[str]:
    """`python scripts/bench.py --worker JOB.json`: one row of ours (python API) or theirs."""
    return [sys.executable, str(Path(__file__).resolve().parent.parent / "bench.py"), "--worker", job_file]


def last_json(stdout: str) -> dict:
    """A worker's result: its last stdout line."""
    lines = [l for l in stdout.splitlines() if l.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# ----------------------------------------------------------------------------- machine

def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = sorted(f for f in flags if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16",
                                            "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return dict(cpu=cpu or platform.processor(), simd=simd, cores=os.cpu_count(), cores_usable=len(os.sched_getaffinity(0)),
                mem_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                load_avg=[round(x, 2) for x in os.getloadavg()], python=platform.python_version(),
                versions={p: _version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch",
                                                   "transformers", "trl", "peft", "datasets")},
                git=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join(["python"] + sys.argv))


def peak_rss_self_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ----------------------------------------------------------------------------- table

def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def table(title: str, header: list[str], rows: list[list], keep: int = 4) -> str:
    """Aligned columns; a column past the first `keep` that is empty on every row is left out."""
    shown = [i for i in range(len(header)) if i < keep or any(r[i] not in (None, "") for r in rows)]
    header, rows = [header[i] for i in shown], [[r[i] for i in shown] for r in rows]
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells[1:]]
    return "\n".join(lines)
