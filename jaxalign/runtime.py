"""Process-wide performance settings that `jaxalign` applies on its own, so that a user who
types `jaxalign sft ...` on a fresh machine gets what the benchmarks measure.

Two things cannot be changed from inside a running process and are therefore arranged
before jax is imported:

* **The host allocator.** XLA's CPU runtime allocates and frees every step's activations
  with malloc. glibc serves large blocks with fresh mmaps and unmaps them on free, so each
  training step page-faults (and the kernel zeroes) gigabytes again: 25-35% of a SmolLM2 SFT
  step (docs/architecture.md, CPU facts). mimalloc, told never to purge on its own, keeps
  freed memory mapped and reuses it; `release_free_memory` hands it back where a phase of the
  run ends (a pipeline stage, the RL programs' compilation, the last step before the final
  checkpoint), so one phase's high-water mark is not kept under the next. It ships as the
  PyPI wheel `cmeel-mimalloc` (a dependency on x86-64 Linux), and the entry point
  re-executes itself once with it in LD_PRELOAD, since an allocator can only be swapped
  before the first malloc. `JAXALIGN_ALLOCATOR=system` keeps glibc.
* **XLA flags** are read once, when the backend starts (none are needed today: every
  flag tried on the CPU backend was slower or neutral; see docs/bench/README.md).

Everything else is a jax config option set in `configure_jax`:

* **The persistent compilation cache** (on by default under `$JAXALIGN_CACHE/xla`,
  `JAXALIGN_COMPILE_CACHE=DIR` moves it, `=off` disables it; kept under
  `JAXALIGN_COMPILE_CACHE_GB`, default 4, least recently used programs deleted at start):
  a rerun, a resume or a second run with the same shapes loads its programs instead of
  compiling them. Programs go into a folder per host kind (`host_key`): XLA compiles CPU
  programs for the host's own instruction set, and jax's cache key does not name the CPU,
  so a home directory shared by different machines (a cluster's NFS home, CI runners)
  would otherwise hand one machine another's machine code.
* **Compilation counters** (`compile_stats`), which the training loops write to perf.jsonl,
  so that a recompilation after warm-up is visible (and tested).

And one per-backend choice the training recipes read, `train_layout`: how the layers of the
training forward run, unless model.scan_layers / model.remat say otherwise.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
import threading
from pathlib import Path

ALLOCATOR_ENV = "JAXALIGN_ALLOCATOR"      # mimalloc (default where available) | system
COMPILE_CACHE_ENV = "JAXALIGN_COMPILE_CACHE"
_REEXEC_MARK = "JAXALIGN_ALLOCATOR_PRELOADED"

# mimalloc options (read from the environment by the library). The purge delay (ms, times the
# arena multiplier 10) is a year: freed pages stay mapped, so the next step's buffers reuse
# them without page faults, but unlike -1 (no purging at all) each freed range is still marked
# for purging, so a forced `mi_collect` (`release_free_memory`) returns it at once. With -1 the
# pipeline's data + sft + rm stages peaked at 7.1 GiB against 2.45 GiB under glibc
# (docs/bench/2026-12-07_cpu_rlhf_main_job_before_after.txt): nothing freed ever went back.
# The largest object an arena serves (mimalloc's default 2 GiB) is raised to 1 TiB (a bare
# number would be read as bytes, hence the unit): a bigger block went straight to the OS,
# mapped and unmapped on every step. The bf16 SmolLM2 SFT step at 8 x 256 has one such
# buffer (2.7 GiB of temporaries): 1,357 huge-page faults and ~0.8 s of system time a step,
# none with the limit raised (scripts/step_faults.py;
# docs/bench/2026-12-07_cpu_page_faults_arena_limit.txt).
MIMALLOC_ENV = {"MIMALLOC_PURGE_DELAY": str(365 * 24 * 3600 * 1000 // 10),
                "MIMALLOC_ARENA_MAX_OBJECT_SIZE": "1TiB"}


def cache_root() -> Path:
    return Path(os.environ.get("JAXALIGN_CACHE", Path.home() / ".cache" / "jaxalign"))


def mimalloc_path() -> Path | None:
    """libmimalloc.so from the `cmeel-mimalloc` wheel, if installed in this environment."""
    for key in ("purelib", "platlib"):
        lib = Path(sysconfig.get_paths()[key]) / "cmeel.prefix" / "lib" / "libmimalloc.so"
        if lib.is_file():
            return lib
    return None


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute under, or None when the process is already set up.

    None when: the user asked for the system allocator, we already re-executed, the user
    preloads something of their own, or no mimalloc library is installed (other platforms).
    """
    env = dict(os.environ if environ is None else environ)
    choice = env.get(ALLOCATOR_ENV, "mimalloc").strip().lower()
    if choice == "system" or env.get(_REEXEC_MARK) or env.get("LD_PRELOAD"):
        return None
    if choice != "mimalloc":
        raise SystemExit(f"jaxalign: {ALLOCATOR_ENV}={choice!r}: expected mimalloc or system")
    lib = mimalloc_path()
    if lib is None or not sys.platform.startswith("linux"):
        return None
    for key, value in MIMALLOC_ENV.items():
        env.setdefault(key, value)
    env["LD_PRELOAD"] = str(lib)
    env[_REEXEC_MARK] = "1"
    return env


def reexec_with_allocator(argv: list[str], script: str | None = None) -> None:
    """Replaces this process by the same command under mimalloc (see the module doc).

    Called first thing in `cli.main`, before jax (and its allocator use) is loaded, and by the
    measuring scripts (`script`: the path of the script to run again), so that they time what
    the CLI runs. Returns only when there is nothing to do."""
    env = allocator_env()
    if env is None or "jax" in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # -P (Python >= 3.11, which jaxalign requires): `python -m` would otherwise put the working
    # directory first on sys.path, so an argparse.py (or json.py, ...) where the user typed
    # `jaxalign` would run in place of the standard library; the console script never had it
    # there, so imports (reward functions included) resolve the same with and without this.
    # A script keeps its own folder first on sys.path (its sibling modules), as it had.
    target = [script] if script is not None else ["-P", "-m", "jaxalign.cli"]
    os.execve(sys.executable, [sys.executable, *target, *argv], env)


def allocator_in_use() -> str:
    """'mimalloc' when this process runs under the preloaded mimalloc, else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return "mimalloc" if "libmimalloc" in maps else "system"


def _free_memory_call():
    """The allocator's "hand free memory back" call: mimalloc's forced collect when it is
    preloaded, else glibc's malloc_trim(0); None when neither is found."""
    import ctypes
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    for name, args in (("mi_collect", (ctypes.c_bool(True),)), ("malloc_trim", (0,))):
        fn = getattr(process, name, None)
        if fn is not None:
            return lambda fn=fn, args=args: fn(*args)
    return None


_release = None


def rss_gib() -> float | None:
    """This process's resident set in GiB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def release_free_memory() -> float | None:
    """Hands the allocator's free pages back to the system; returns the GiB the resident set
    shrank by (None where that cannot be done or read). Milliseconds; the next allocations of
    the same size page-fault again, so it belongs where a phase ends, not inside a step."""
    global _release
    if _release is None:
        _release = _free_memory_call() or (lambda: None)
    before = rss_gib()
    _release()
    after = rss_gib()
    return None if before is None or after is None else before - after


# XLA's CPU client hands a step's temporaries back to the allocator from its own thread a
# moment after the step's outputs are ready. A step dispatched at once can allocate its own
# before that, and the process then holds two sets: the bf16 SmolLM2 RM step (2.3 GiB of
# temporaries) peaked at 5.6 or 8.05 GiB from run to run (2 runs of 5 high); with a 20 ms
# pause between the outputs and the next dispatch, 6 runs of 6 at 5.6 GiB
# (docs/bench/2026-12-07_cpu_dispatch_settle.txt). Only steps with large temporaries pause.
SETTLE_S = 0.02
SETTLE_MIN_BYTES = 256 << 20


def settle_seconds(executable) -> float:
    """How long to pause, on the CPU, between a step's outputs being ready and dispatching the
    next run of `executable` (a compiled program): SETTLE_S when its temporaries are large."""
    try:
        analysis = executable.memory_analysis()
    except (AttributeError, NotImplementedError):   # some backends do not say
        return 0.0
    temp = getattr(analysis, "temp_size_in_bytes", 0) if analysis is not None else 0
    return SETTLE_S if temp >= SETTLE_MIN_BYTES else 0.0


# ----------------------------------------------------------------------------- jax settings

_stats = {"compiles": 0, "compile_s": 0.0, "cache_hits": 0, "cache_misses": 0}
_lock = threading.Lock()
_listening = False


def _on_event(name: str, **_):
    if name == "/jax/compilation_cache/cache_hits":
        with _lock:
            _stats["cache_hits"] += 1
    elif name == "/jax/compilation_cache/cache_misses":
        with _lock:
            _stats["cache_misses"] += 1


def _on_duration(name: str, secs: float, **_):
    # Fired once per executable jax had to produce: compiled, or loaded from the cache.
    if name == "/jax/core/compile/backend_compile_duration":
        with _lock:
            _stats["compiles"] += 1
            _stats["compile_s"] += secs


def count_compilations() -> None:
    """Starts counting compilations (idempotent); read them with `compile_stats`."""
    global _listening
    if _listening:
        return
    import jax
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _listening = True


def compile_stats() -> dict[str, float]:
    """Cumulative counts for this process: programs compiled or loaded (`compiles`), their
    total backend time, and persistent-cache hits / misses."""
    with _lock:
        return dict(_stats)


def compile_cache_dir(environ: dict[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    value = env.get(COMPILE_CACHE_ENV, "").strip()
    if value.lower() in ("off", "0", "none", "false"):
        return None
    return Path(value).expanduser() if value else cache_root() / "xla"


COMPILE_CACHE_GB_ENV = "JAXALIGN_COMPILE_CACHE_GB"   # size cap of the compile cache (default 4)


def compile_cache_bytes(environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    raw = env.get(COMPILE_CACHE_GB_ENV, "4").strip()
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise SystemExit(f"jaxalign: {COMPILE_CACHE_GB_ENV}={raw!r}: expected a size in GiB > 0")
    return int(gb * 2**30)


def trim_compile_cache(cache: Path, max_bytes: int) -> int:
    """Deletes the least recently used entries until the cache holds at most `max_bytes`;
    returns the bytes freed. Done at start-up, so the cache exceeds its cap by at most one
    run's new programs. Not jax's own LRU mode (jax_compilation_cache_max_size): that one
    needs an -atime file beside every entry and fails every write in a directory that an
    unbounded run filled before."""
    entries = []
    for p in cache.rglob("*"):   # every host kind's folder (and entries of older versions)
        try:
            st = p.stat()
        except OSError:   # another process evicted it meanwhile
            continue
        if p.is_file():
            entries.append((max(st.st_atime, st.st_mtime), st.st_size, p))
    total, freed = sum(e[1] for e in entries), 0
    for _, size, p in sorted(entries):
        if total - freed <= max_bytes:
            break
        try:
            p.unlink()
            freed += size
        except OSError:
            pass
    return freed


def host_key(cpuinfo: str | None = None) -> str:
    """A short name for the kind of machine a compiled CPU program can run on: the jaxlib
    version and a digest of the CPU's model name and instruction-set flags."""
    import jaxlib

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    fields = {}
    for line in cpuinfo.splitlines():     # the first processor's entries are enough
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "flags", "Features", "CPU part") and key not in fields:
            fields[key] = " ".join(sorted(value.split()))
    described = "\n".join(f"{k}={fields[k]}" for k in sorted(fields)) or platform.processor()
    digest = hashlib.sha256(f"{platform.machine()}\n{described}".encode()).hexdigest()[:12]
    return f"jaxlib{jaxlib.__version__}-{digest}"


def configure_jax() -> dict[str, str]:
    """Applies the jax-level settings; returns what was chosen, for the run log."""
    import jax

    count_compilations()
    chosen = {"allocator": allocator_in_use()}
    root = compile_cache_dir()
    cache = None if root is None else root / host_key()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        # Cache every program: the small ones (optimizer init, eval, data placement) add up
        # to seconds at start-up too, and a cache entry costs only its file.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        trim_compile_cache(root, compile_cache_bytes())   # one cap for all host kinds
    chosen["compile_cache"] = str(cache) if cache is not None else "off"
    return chosen


# ----------------------------------------------------------------------------- layer layout

# (scan_layers, remat, unroll_up_to) of the training forward per backend and compute dtype,
# measured side by side on SmolLM2 (docs/bench/README.md). CPU, fp32 (SFT 8 x 256): scanned
# layers keeping the projection outputs and the attention's output and log-sum-exp ("attn":
# only elementwise work is recomputed) took the step from 13.7 s with full remat to 12.2 s, at
# 5.7 instead of 4.0 GiB; unrolled is no faster there (8.64 vs 8.79 s in the 2026-12-07
# profile) at 9.1 instead of 6.3 GiB. CPU, bf16: a scan pays for stacking each layer's saved
# values (a converting copy per value and layer, the stacked buffers zero-filled every step),
# so on short rows unrolled layers without remat are faster on every workload (2026-12-07,
# docs/bench/2026-12-07_cpu_layout_ab.txt: SFT -14%, LoRA -12%, DPO -25%, RM -28%, GRPO / PPO
# -12% / -11%) for +0.4 to +1.3 GiB and a compile 2-4x as long; on long rows the scan is as
# fast or faster for less memory (SFT 2 x 1024: 5.05 against 4.89 s unrolled, at 5.6 instead
# of 7.6 GiB; 2 x 4096: 29.4 against 37.4 s; docs/bench/2026-12-07_cpu_sft_row_length.txt),
# hence unrolled up to 512 tokens a row. GPU
# (H200, bf16): unrolled without remat was the fastest. Other backends: scanned with full
# remat, the memory-safe choice (not measured here). A run that does not fit is refused by
# the memory pre-flight, which suggests model.remat=full.
TRAIN_LAYOUTS = {("cpu", "float32"): (True, "attn", 0), ("cpu", "bfloat16"): (True, "attn", 512),
                 ("gpu", "float32"): (False, "none", 0), ("gpu", "bfloat16"): (False, "none", 0)}


def train_layout(dtype: str = "float32", backend: str | None = None) -> tuple[bool, str, int]:
    """(scan_layers, remat, unroll_up_to) of the training forward for a compute dtype on a
    backend (the default backend when None): `ModelConfig.unroll_up_to`."""
    if backend is None:
        import jax
        backend = jax.default_backend()
    return TRAIN_LAYOUTS.get((backend, dtype), (True, "full", 0))
