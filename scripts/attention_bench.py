"""Time one SmolLM2-shaped causal attention layer, forward + backward, as the train step runs it
(`jaxalign.models.attention.causal_attention`, random q / k / v, a causal mask), and print what
XLA's compiled program holds in temporaries: a whole step's attention costs about num_layers
(30) times the time printed.

  python scripts/attention_bench.py [--batch 8] [--seq 256] [--dtype float32] [--repeat 20]
                                    [--query-block N --key-block N] [--impl FILE.py] [--in-step]

`--impl` loads another version of the module (e.g. one saved from an earlier commit with
`git show REV:jaxalign/models/attention.py > /tmp/old.py`) to time before and after in one run;
a module without `plan` gets its own `query_blocks(T)`.

`--in-step` measures the attention's share of the SmolLM2 SFT step itself (the step as
`jaxalign sft` builds it, scripts/profile_step.py): the step timed with each attention module
(the current one and every `--impl`), and again with every layer's attention replaced by
q + k + v (the heads broadcast; no scores, same shapes, gradients to all three), the programs'
steps alternating (--repeat / 4 steps each, at least 3); the difference is what the attention
costs the step, its interplay with the rest of the program included.

Like the CLI, the script re-executes itself once under the allocator the CLI preloads
(jaxalign/runtime.py; `JAXALIGN_ALLOCATOR=system` keeps glibc): under glibc each call maps and
page-faults its temporaries afresh, which nearly doubled the layer's time here (25.7 against
14.3 ms a layer at 8 x 256 in bf16, docs/bench/2026-12-07_cpu_attention_in_step.txt).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--query-block", type=int)
    ap.add_argument("--key-block", type=int)
    ap.add_argument("--impl", action="append", default=[], help="another attention.py to time too")
    ap.add_argument("--in-step", action="store_true",
                    help="the attention's share of the SmolLM2 SFT step (B x T, --dtype)")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxalign.models import attention
    from jaxalign.runtime import allocator_in_use

    B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    dt = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32).astype(dt)
    k = jax.random.normal(keys[1], (B, T, K, H), jnp.float32).astype(dt)
    v = jax.random.normal(keys[2], (B, T, K, H), jnp.float32).astype(dt)
    dout = jax.random.normal(keys[3], (B, T, N, H), jnp.float32).astype(dt)
    mask = jnp.asarray(np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)))

    impls = [("current", attention)]
    for i, path in enumerate(args.impl):
        spec = importlib.util.spec_from_file_location(f"_attention_impl_{i}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        impls.append((path, mod))
    if args.in_step:
        return in_step(args, impls)
    print(f"B={B} T={T} N={N} K={K} H={H} {dt.name}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s), allocator {allocator_in_use()}")
    runs = []
    for name, mod in impls:
        if hasattr(mod, "plan"):
            blocks = mod.plan(T, args.query_block, args.key_block)
        else:
            blocks = mod.query_blocks(T)
        scale = H ** -0.5

        def step(q, k, v, dout, mod=mod, blocks=blocks):
            out, vjp = jax.vjp(lambda q, k, v: mod.causal_attention(q, k, v, mask, blocks, dt, scale),
                               q, k, v)
            return out, vjp(dout)

        t0 = time.perf_counter()
        compiled = jax.jit(step).lower(q, k, v, dout).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
        jax.block_until_ready(compiled(q, k, v, dout))
        runs.append((name, compiled, compile_s, temp, len(getattr(blocks, "blocks", blocks)), []))
    # The versions' calls alternate, so that a drift of the machine's speed reaches them alike.
    for _ in range(args.repeat):
        for _, compiled, _, _, _, times in runs:
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v, dout))
            times.append(time.perf_counter() - t0)
    for name, _, compile_s, temp, n_blocks, times in runs:
        print(f"{name}: fwd+bwd median {1e3 * statistics.median(times):.2f} ms, "
              f"min {1e3 * min(times):.2f} ms over {args.repeat}; compile {compile_s:.1f} s; "
              f"temporaries {temp / 2**20 if temp is not None else float('nan'):.1f} MiB; "
              f"{n_blocks} query blocks")


def in_step(args, impls) -> int:
    """The SFT step's time with each attention module of `impls` and with none (see the
    module doc), the programs' steps alternating."""
    import jax
    import jax.numpy as jnp
    from jaxalign import runtime, sharding
    from jaxalign.config import LoRAConfig, MeshConfig, ModelSource
    from jaxalign.models import attention

    sys.path.insert(0, str(Path(__file__).parent))
    from fetch_smollm2 import fetch
    from profile_step import build_sft_step

    real = attention.causal_attention

    def stand_in(q_BTNH, k_BSKH, v_BSKH, mask_BTS, plan_, dt, scale):
        G = q_BTNH.shape[2] // k_BSKH.shape[2]
        return q_BTNH + jnp.repeat(k_BSKH + v_BSKH, G, axis=2)

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    source = ModelSource(path=str(fetch()), dtype=args.dtype)
    runs = {}
    with jax.set_mesh(mesh):
        for name, fn in [(n, m.causal_attention) for n, m in impls] + [("replaced", stand_in)]:
            attention.causal_attention = fn   # read at trace time by jaxalign.models.llama
            try:
                policy, state, step, batch = build_sft_step(source, LoRAConfig(), mesh,
                                                            args.batch, args.seq)
                for _ in range(2):
                    state, metrics = step(state, policy.frozen, batch)
                    jax.block_until_ready(metrics)
            finally:
                attention.causal_attention = real
            runs[name] = [policy, state, step, batch, []]
        for _ in range(max(3, args.repeat // 4)):
            for run in runs.values():
                policy, state, step, batch, times = run
                t0 = time.perf_counter()
                run[1], metrics = step(state, policy.frozen, batch)
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - t0)
    print(f"SFT step {args.batch} x {args.seq} {args.dtype}, allocator {runtime.allocator_in_use()}, "
          f"{policy.cfg.num_layers} layers, the programs' steps alternating:")
    med = {name: statistics.median(run[4]) for name, run in runs.items()}
    for name, s_ in med.items():
        share = "" if name == "replaced" else f"; the attention's share {s_ - med['replaced']:.3f} s"
        print(f"  attention {name}: median {s_:.3f} s, min {min(runs[name][4]):.3f} s{share}")
    print("  (share: the median's difference from the step whose attention is replaced by q + k + v)")
    return 0


if __name__ == "__main__":
    from jaxalign import runtime
    runtime.reexec_with_allocator(sys.argv[1:], script=__file__)
    sys.exit(main())
