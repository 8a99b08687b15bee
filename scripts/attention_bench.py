"""Time one SmolLM2-shaped causal attention layer, forward + backward, as the train step runs it
(`jaxalign.models.attention.causal_attention`, random q / k / v, a causal mask), and print what
XLA's compiled program holds in temporaries: a whole step's attention costs about num_layers
(30) times the time printed.

  python scripts/attention_bench.py [--batch 8] [--seq 256] [--dtype float32] [--repeat 20]
                                    [--query-block N --key-block N] [--impl FILE.py]

`--impl` loads another version of the module (e.g. one saved from an earlier commit with
`git show REV:jaxalign/models/attention.py > /tmp/old.py`) to time before and after in one run;
a module without `plan` gets its own `query_blocks(T)`.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time


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
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxalign.models import attention

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
    print(f"B={B} T={T} N={N} K={K} H={H} {dt.name}, backend {jax.default_backend()}, "
          f"{jax.device_count()} device(s)")
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
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v, dout))
            times.append(time.perf_counter() - t0)
        print(f"{name}: fwd+bwd median {1e3 * statistics.median(times):.2f} ms, "
              f"min {1e3 * min(times):.2f} ms over {args.repeat}; compile {compile_s:.1f} s; "
              f"temporaries {temp / 2**20 if temp is not None else float('nan'):.1f} MiB; "
              f"{len(blocks)} query blocks")


if __name__ == "__main__":
    main()
