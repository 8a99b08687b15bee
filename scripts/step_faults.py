"""Page faults and system time per training step: where does a step's kernel time go?

  python scripts/step_faults.py [--model HF_DIR] [--batch 8] [--seq 256] [--steps 4]
                                [--dtype float32] [--lora-rank 0] [--perf-out FILE]

Builds the SFT step the way `jaxalign sft` does (as scripts/profile_step.py does), runs two
warm-up steps, then `--steps` steps, and prints per step: wall time, minor / major faults,
user and system CPU time (getrusage of this process, all threads), the growth of the
process's anonymous huge pages (smaps_rollup), and, when /proc/vmstat has them, the
machine-wide THP fault and zeroing counters (other processes add to those).

The allocator is whatever the environment gives: run it under the CLI's setting with
  LD_PRELOAD=$(python -c 'from jaxalign.runtime import mimalloc_path; print(mimalloc_path())') \\
  MIMALLOC_PURGE_DELAY=3153600000 MIMALLOC_ARENA_MAX_OBJECT_SIZE=1TiB python scripts/step_faults.py
and vary one MIMALLOC_* option (or XLA flag) at a time. `--perf-out FILE` writes this
process's pid to FILE after the warm-up and waits 3 s, so that
  perf record -e page-faults -g -p PID
can attach to the measured steps only (docs/bench/2026-12-06_cpu_page_faults.txt).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path


def _vmstat(keys=("thp_fault_alloc", "pgfault", "thp_collapse_alloc")) -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            k, v = line.split()
            if k in keys:
                out[k] = int(v)
    except OSError:
        pass
    return out


def _anon_huge_kb() -> int:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: the cached SmolLM2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--no-donate", action="store_true",
                    help="call the step without donating the state (to see what donation saves)")
    ap.add_argument("--perf-out", default=None)
    args = ap.parse_args(argv)

    import jax
    from jaxalign import runtime, sharding
    from jaxalign.config import LoRAConfig, MeshConfig, ModelSource

    runtime.configure_jax()
    sys.path.insert(0, str(Path(__file__).parent))
    from profile_step import build_sft_step
    if args.model is None:
        from fetch_smollm2 import fetch
        args.model = str(fetch())
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else LoRAConfig()
        policy, state, step, batch = build_sft_step(ModelSource(path=args.model, dtype=args.dtype),
                                                    lora, mesh, args.batch, args.seq)
        B, T = args.batch, args.seq

        def run(state):
            if args.no_donate:   # a copy is donated, so the state itself stays alive
                state = jax.tree.map(lambda x: x.copy(), state)
            state, metrics = step(state, policy.frozen, batch)
            jax.block_until_ready((state, metrics))
            return state

        for _ in range(2):
            state = run(state)
        if args.perf_out:
            import os
            Path(args.perf_out).write_text(str(os.getpid()))
            time.sleep(3.0)
        print(f"SFT step {B} x {T}, {args.dtype}, lora_rank {args.lora_rank}, "
              f"donate {not args.no_donate}; RSS {_rss_kb() / 2**20:.2f} GiB after warm-up")
        print(f"{'step':>4} {'wall s':>7} {'minflt':>8} {'majflt':>6} {'user s':>7} {'sys s':>6} "
              f"{'+AnonHuge MiB':>13} {'thp_fault_alloc*':>16} {'pgfault*':>9}")
        rows = []
        for i in range(args.steps):
            r0, v0, h0, t0 = resource.getrusage(resource.RUSAGE_SELF), _vmstat(), _anon_huge_kb(), time.perf_counter()
            state = run(state)
            r1, v1, h1, t1 = resource.getrusage(resource.RUSAGE_SELF), _vmstat(), _anon_huge_kb(), time.perf_counter()
            row = (t1 - t0, r1.ru_minflt - r0.ru_minflt, r1.ru_majflt - r0.ru_majflt,
                   r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, (h1 - h0) / 1024,
                   v1.get("thp_fault_alloc", 0) - v0.get("thp_fault_alloc", 0),
                   v1.get("pgfault", 0) - v0.get("pgfault", 0))
            rows.append(row)
            print(f"{i + 1:4d} {row[0]:7.2f} {row[1]:8d} {row[2]:6d} {row[3]:7.2f} {row[4]:6.2f} "
                  f"{row[5]:13.0f} {row[6]:16d} {row[7]:9d}")
        mean = [sum(c) / len(rows) for c in zip(*rows)]
        print(f"mean {mean[0]:7.2f} {mean[1]:8.0f} {mean[2]:6.0f} {mean[3]:7.2f} {mean[4]:6.2f} "
              f"{mean[5]:13.0f} {mean[6]:16.0f} {mean[7]:9.0f}")
        print(f"RSS {_rss_kb() / 2**20:.2f} GiB at the end; * machine-wide counters "
              f"(other processes included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
