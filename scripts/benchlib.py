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
