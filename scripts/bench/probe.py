"""This machine's limits, measured in the same run as the rows (its own child process):
the matmul peak (FLOP/s) and the memory bandwidth (bytes/s), both through JAX on the
backend ours runs on."""

from __future__ import annotations

import time


def _best(fn, repeats: int) -> float:
    fn()  # compile / first touch
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def probe(job: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    gpu = jax.default_backend() != "cpu"
    # A training-like shape on CPU (tokens x hidden x MLP width of SmolLM2's step); a large
    # square one on an accelerator, which a small matmul cannot fill.
    m, k, n = (8192, 8192, 8192) if gpu else (2048, 576, 1536)
    out = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (m, k), dtype)
        b = jax.random.normal(jax.random.key(1), (k, n), dtype)
        # bf16 as the model runs it: bf16 operands, fp32 accumulation and result. A plain
        # bf16 @ bf16 -> bf16 dot takes XLA CPU's slow path (~250 GFLOP/s on an AMX Xeon where
        # this form runs ~1200; scripts/bf16_dot_probe.py), which would understate the peak.
        mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        s = _best(lambda: mm(a, b).block_until_ready(), 10)
        out[f"matmul_{name}_flops"] = 2 * m * k * n / s
    out["matmul_shape"] = [m, k, n]
    # Memory: a jitted reduction over 512 MiB (GPU: 2 GiB), read once, best of 5; numpy's
    # single-threaded copy (reads + writes) for reference.
    x = jnp.ones((2 ** (29 if gpu else 27),), jnp.float32)
    red = jax.jit(jnp.sum)
    out["mem_read_bytes_per_s"] = x.nbytes / _best(lambda: red(x).block_until_ready(), 5)
    src = np.ones(2 ** 26, np.float32)
    dst = np.empty_like(src)
    out["numpy_copy_bytes_per_s"] = 2 * src.nbytes / _best(lambda: np.copyto(dst, src), 5)
    return out
