"""Shared plumbing for the benchmark scripts: allocator choice, timing, the result table.

Both sides of every comparison run in one process, so they share the allocator:
`--allocator jemalloc` (default where installed) re-executes the script with jemalloc
preloaded, which removes 25-35% of page-fault time from JAX and torch alike
(DESIGN.md section 5).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
_MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def add_allocator_arg(parser) -> None:
    parser.add_argument("--allocator", choices=("jemalloc", "glibc"),
                        default="jemalloc" if JEMALLOC.exists() else "glibc",
                        help="malloc for both sides (jemalloc: `apt-get install libjemalloc2`)")


def ensure_allocator(allocator: str) -> str:
    """Re-executes the current script with jemalloc preloaded when asked and not yet so."""
    if allocator == "jemalloc":
        if not JEMALLOC.exists():
            sys.exit(f"{JEMALLOC} not found: `apt-get install libjemalloc2` or pass --allocator glibc")
        if str(JEMALLOC) not in os.environ.get("LD_PRELOAD", ""):
            env = dict(os.environ, LD_PRELOAD=str(JEMALLOC), MALLOC_CONF=_MALLOC_CONF)
            os.execve(sys.executable, [sys.executable] + sys.argv, env)
    return allocator


def timeit(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds (fn must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print(line)
    for r in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def jax_device_name() -> str:
    import jax
    d = jax.devices()[0]
    return "cpu" if d.platform == "cpu" else f"{d.platform} {d.device_kind}"


def jax_peak_device_gib() -> float | None:
    """Peak bytes held by JAX's allocator on device 0; None on CPU (no allocator stats)."""
    import jax
    d = jax.devices()[0]
    stats = d.memory_stats() if d.platform != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def torch_device_name() -> str:
    import torch
    return f"cuda {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "cpu"


def torch_peak_device_gib() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- one row, one process

def worker(job: dict, runner: Callable[[dict], dict]) -> None:
    """The `--worker JSON` side: runs one row and prints its result as the last stdout line."""
    import json
    out, sys.stdout = sys.stdout, sys.stderr  # libraries' prints must not corrupt the result line
    result = runner(job)
    result["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(result), file=out, flush=True)


def child_env(allocator: str) -> dict:
    env = dict(os.environ)
    if allocator == "glibc":  # never let an inherited preload change the allocator under test
        kept = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "jemalloc" not in p]
        env["LD_PRELOAD"] = ":".join(kept)
        env.pop("MALLOC_CONF", None)
    return env


def run_row(script: str, job: dict, allocator: str, label: str,
            summary: Callable[[dict], str]) -> dict:
    """Runs `script --worker JSON` in its own process (so its peak RSS is its own) and returns
    the row's result, or {"error": ...} when the process failed (its stderr is shown)."""
    import json
    import subprocess
    tag = Path(script).stem
    print(f"[{tag}] running {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(job)],
                          stdout=subprocess.PIPE, text=True, env=child_env(allocator))
    if proc.returncode != 0:
        print(f"[{tag}] {label} failed (exit {proc.returncode})", file=sys.stderr)
        return {"error": f"exit {proc.returncode}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[{tag}] {label}: {summary(res)} ({time.perf_counter() - t0:.0f} s wall)",
          file=sys.stderr, flush=True)
    return res


# ----------------------------------------------------------------------------- shared settings

# LoRA of every comparison, the same on both sides: rank 16, alpha 32, on q_proj and v_proj.
LORA = dict(rank=16, alpha=32.0, targets=("q_proj", "v_proj"))
OURS_CONFIGS = tuple(f"{layers}/{remat}" for layers in ("unrolled", "scan")
                     for remat in ("none", "full", "dots"))


def parse_list(parser, flag: str, value: str, allowed) -> list[str]:
    """A comma list from the command line, every item one of `allowed` (else a usage error)."""
    items = [v for v in value.split(",") if v]
    if bad := [v for v in items if v not in allowed]:
        parser.error(f"{flag}: unknown {bad}; expected some of {', '.join(allowed)}")
    return items


def peft_lora(mode: str):
    """PEFT's LoraConfig equal to LORA for mode 'lora'; None for full fine-tuning."""
    if mode != "lora":
        return None
    from peft import LoraConfig
    return LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                      target_modules=list(LORA["targets"]), task_type="CAUSAL_LM")


def trl_step_timer(log_key: str = "loss"):
    """A transformers TrainerCallback that times each optimizer step (on_step_begin ->
    on_step_end, CUDA synchronised) into `.times`, keeps the logs holding `log_key` in `.logs`
    and the peak RSS before the first step in `.rss_setup`."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.logs, self._t0, self.rss_setup = [], [], 0.0, None

        def on_step_begin(self, args, state, control, **kw):
            if self.rss_setup is None:
                self.rss_setup = peak_rss_gib()
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():  # CUDA kernels run asynchronously: wait for the step
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and log_key in logs:
                self.logs.append(dict(logs))

    return StepTimer()
