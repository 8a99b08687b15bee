"""Where an SFT step's time goes on the CPU: thread-time per XLA op kind, and how many cores
the process kept busy (CPU time / wall time of the traced step).

The traced events cover the ops the executor ran on each thread; the work a matmul hands to
the other thread of the pool carries no event of its own, so "busy" from the events alone
undercounts: an earlier version of this script read "one thread busy 7.3 s of 11.0" from the
events while the process used 1.9 cores throughout (docs/bench/README.md).

  python scripts/profile_step.py [--model HF_DIR] [--batch 8] [--seq 256] [--remat full]
                                 [--scan-layers true] [--lora-rank 0] [--dtype bfloat16] [--top 12]

Builds the step the way `jaxalign sft` does (`setup.load_policy`, `sft_loss_fn`,
`make_train_step` / `jit_train_step`), runs two steps, traces the third with jax.profiler and
reads the trace back (`jax.profiler.ProfileData`). Random token ids; SmolLM2 by default. Like
the CLI, it re-executes itself once under the allocator the CLI preloads (jaxalign/runtime.py;
`JAXALIGN_ALLOCATOR=system` keeps glibc).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path


def busy_profile(trace_dir: str) -> tuple[collections.Counter, collections.Counter, dict]:
    """(thread-time per op kind, event count per kind, {0|1|2: ns with that many threads busy})."""
    from jax.profiler import ProfileData
    trace = sorted(Path(trace_dir).rglob("*.xplane.pb"))[-1]
    kinds, counts, threads = collections.Counter(), collections.Counter(), collections.defaultdict(list)
    for plane in ProfileData.from_file(str(trace)).planes:
        for line in plane.lines:
            if "Eigen" not in line.name:      # XLA CPU's worker threads
                continue
            for ev in line.events:
                # Containers (loops, calls) hold the ops counted below; executor bookkeeping too.
                if ev.name.startswith(("ThunkExecutor", "end:", "while", "conditional", "call")):
                    continue
                kind = re.sub(r"[.\d]+$", "", ev.name)
                kinds[kind] += ev.duration_ns
                counts[kind] += 1
                threads[line.name].append((ev.start_ns, ev.start_ns + ev.duration_ns))
    edges = []
    for spans in threads.values():        # each thread's busy time as disjoint intervals
        merged: list[list[int]] = []
        for a, b in sorted(spans):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        edges += [(a, 1) for a, _ in merged] + [(b, -1) for _, b in merged]
    edges.sort()
    busy, running, last = collections.Counter(), 0, edges[0][0]
    for t, step in edges:
        busy[min(running, 2)] += t - last
        running, last = running + step, t
    return kinds, counts, busy


def build_sft_step(source, lora, mesh, B: int, T: int):
    """The SFT step as `jaxalign sft` builds it (`setup.load_policy`, `sft_loss_fn`,
    `make_train_step` / `jit_train_step`) on B x T random token ids, under `mesh`:
    (policy, state, jitted step, batch on the devices). scripts/step_faults.py uses it too."""
    import jax
    import numpy as np
    from jaxalign.config import OptimConfig
    from jaxalign.precision import rounds_stochastically
    from jaxalign.sharding import batch_sharding
    from jaxalign.train.optim import make_optimizer
    from jaxalign.train.setup import load_policy
    from jaxalign.train.sft import sft_loss_fn
    from jaxalign.train.step import init_state, jit_train_step, make_train_step

    policy = load_policy(source, lora, mesh, 0)
    optimizer, schedule = make_optimizer(OptimConfig(lr=1e-5), 10)
    state = jax.jit(init_state, static_argnums=(1, 2))(policy.trainable, optimizer, 0)
    # Weights read stochastically rounded in bf16, as the CLI's default `train.stochastic_rounding`.
    rounded = rounds_stochastically(policy.cfg.dtype, policy.cfg.param_dtype, True)
    step = jit_train_step(make_train_step(sft_loss_fn(policy.cfg), optimizer, schedule,
                                          round_weights=rounded),
                          jax.tree.map(lambda x: x.sharding, state), policy.frozen_shardings,
                          batch_sharding(mesh))
    tokens = np.random.default_rng(0).integers(3, policy.cfg.vocab_size, (B, T)).astype(np.int32)
    batch = jax.device_put(dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
                                loss_mask=np.ones((B, T), np.float32),
                                segment_ids=np.ones((B, T), np.int32),
                                positions=np.tile(np.arange(T, dtype=np.int32), (B, 1))),
                           batch_sharding(mesh))
    return policy, state, step, batch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: the cached SmolLM2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--remat", default=None, help="none | full | dots (default: the backend's)")
    ap.add_argument("--scan-layers", default=None, choices=("true", "false"))
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    ap.add_argument("--top", type=int, default=12, help="op kinds listed")
    args = ap.parse_args(argv)

    import jax
    from jaxalign import sharding
    from jaxalign.config import LoRAConfig, MeshConfig, ModelSource

    if args.model is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from fetch_smollm2 import fetch
        args.model = str(fetch())
    scan = None if args.scan_layers is None else args.scan_layers == "true"
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        lora = LoRAConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else LoRAConfig()
        policy, state, step, batch = build_sft_step(
            ModelSource(path=args.model, scan_layers=scan, remat=args.remat, dtype=args.dtype),
            lora, mesh, args.batch, args.seq)
        B, T = args.batch, args.seq
        for _ in range(2):
            state, metrics = step(state, policy.frozen, batch)
            jax.block_until_ready(metrics)
        trace = tempfile.mkdtemp(prefix="jaxalign-profile-")
        jax.profiler.start_trace(trace)
        t0, cpu0 = time.perf_counter(), time.process_time()
        state, metrics = step(state, policy.frozen, batch)
        jax.block_until_ready(metrics)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        jax.profiler.stop_trace()
    kinds, counts, busy = busy_profile(trace)
    cfg = policy.cfg
    print(f"SFT step {B} x {T}, scan_layers={cfg.scan_layers}, remat={cfg.remat}, "
          f"lora_rank={cfg.lora_rank}, dtype={args.dtype}: wall {wall:.2f} s")
    print(f"process CPU time {cpu:.2f} s = {cpu / wall:.2f} cores busy on average")
    print(f"op thread-time {sum(kinds.values()) / 1e9:.2f} s (events only; see the module doc): "
          f"one thread in an op {busy[1] / 1e9:.2f} s, two or more {busy[2] / 1e9:.2f} s, "
          f"none {busy[0] / 1e9:.2f} s")
    for kind, ns in kinds.most_common(args.top):
        print(f"  {ns / 1e9:7.2f} s  {counts[kind]:6d}  {kind}")
    return 0


if __name__ == "__main__":
    from jaxalign import runtime
    runtime.reexec_with_allocator(sys.argv[1:], script=__file__)   # the CLI's allocator
    sys.exit(main())
