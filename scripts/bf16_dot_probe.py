"""Which form of a bf16 matmul XLA's CPU backend runs fast, and which it cannot run at all.

For each form of the products a training step takes (forward x W, input gradient g W^T,
weight gradient x^T g, the attention's batched products), with bf16 operands and an fp32
result (`preferred_element_type=float32`), it prints how the compiled program runs the dot
and its speed:
  bf16   the dot stays bf16 x bf16 -> f32 (YNNPACK's fast kernel on AVX512-BF16 / AMX)
  f32    XLA upcast the operands to fp32 first (the library does not take that layout)
  LOOSE  a bf16 x bf16 -> f32 dot left to the generic runtime, which refuses it at run time
         ("Unsupported element type for DotThunk::Execute")
Each form is also tried with the transposed operand copied out by
`jaxalign.precision.materialize` (what jaxalign's bf16 backward passes do): behind an
optimization barrier with a unit axis added, so that XLA can neither fold the transpose back
into the dot nor give it the column-major layout that makes it free (a barrier alone keeps
that layout: the "barrier only" row). Run once as is and once with --onednn (a child process with
XLA_FLAGS=--xla_cpu_use_onednn=true, read only at backend start-up).

    python scripts/bf16_dot_probe.py [--onednn] [--both]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

M, K, N = 2048, 576, 1536          # tokens x hidden x MLP width of SmolLM2's 8 x 256 step
B, KV, R, S, H = 8, 3, 768, 256, 64  # batch, kv heads, rows (256 tokens x 3), keys, head_dim


def _forms():
    import jax
    import jax.numpy as jnp

    from jaxalign.precision import materialize as mat

    f32 = dict(preferred_element_type=jnp.float32)
    bar = jax.lax.optimization_barrier
    mm = 2 * M * K * N
    att = 2 * B * KV * R * S * H
    return [
        # name, fn, operand shapes, flops
        ("fwd x W            [M,K]@[K,N]", lambda x, w: jnp.dot(x, w, **f32), [(M, K), (K, N)], mm),
        ("dx = g W^T (folded)  [M,N]@[K,N]^T", lambda g, w: jnp.dot(g, w.T, **f32), [(M, N), (K, N)], mm),
        ("dx = g W^T dot_general (no transpose op)", lambda g, w: jax.lax.dot_general(
            g, w, (((1,), (1,)), ((), ())), **f32), [(M, N), (K, N)], mm),
        ("dW = x^T g (folded)  [M,K]^T@[M,N]", lambda x, g: jnp.dot(x.T, g, **f32), [(M, K), (M, N)], mm),
        ("dW = x^T g (barrier only)", lambda x, g: jnp.dot(bar(x.T), g, **f32),
         [(M, K), (M, N)], mm),
        ("dW = x^T g (materialize)", lambda x, g: jnp.dot(mat(x.T), g, **f32),
         [(M, K), (M, N)], mm),
        ("attn s = q k^T   bkrh,bksh->bkrs", lambda q, k: jnp.einsum("bkrh,bksh->bkrs", q, k, **f32),
         [(B, KV, R, H), (B, KV, S, H)], att),
        ("attn s, k from (B,S,K,H) transposed", lambda q, k: jnp.einsum(
            "bkrh,bksh->bkrs", q, k.transpose(0, 2, 1, 3), **f32), [(B, KV, R, H), (B, S, KV, H)], att),
        ("attn s, k transposed + materialize", lambda q, k: jnp.einsum(
            "bkrh,bksh->bkrs", q, mat(k.transpose(0, 2, 1, 3)), **f32), [(B, KV, R, H), (B, S, KV, H)], att),
        ("attn o = p v     bkrs,bksh->bkrh", lambda p, v: jnp.einsum("bkrs,bksh->bkrh", p, v, **f32),
         [(B, KV, R, S), (B, KV, S, H)], att),
        ("attn dv = p^T do bkrs,bkrh->bksh", lambda p, d: jnp.einsum("bkrs,bkrh->bksh", p, d, **f32),
         [(B, KV, R, S), (B, KV, R, H)], att),
        ("attn dv^T = mat(do^T) p (jaxalign)", lambda p, d: jnp.einsum(
            "bkhr,bkrs->bkhs", mat(d.swapaxes(2, 3)), p, **f32), [(B, KV, R, S), (B, KV, R, H)], att),
    ]


def _kind(hlo: str) -> str:
    """bf16 / f32 / LOOSE for the (first) dot of a compiled program's text."""
    types = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))
    for line in hlo.splitlines():
        m = re.search(r"(ROOT )?%\S+ = (\w+)\[[^=]*\bdot\(%([\w.\-]+), %([\w.\-]+)\)", line)
        if m:
            lhs = types.get(m.group(3), "?")
            if lhs == "bf16":
                return "bf16" if m.group(1) else "LOOSE"
            return lhs
    return "?"


def run(repeats: int = 5) -> list[tuple[str, str, float]]:
    import jax
    import jax.numpy as jnp

    rows = []
    for name, fn, shapes, flops in _forms():
        args = [jax.random.normal(jax.random.key(i), s, jnp.bfloat16) for i, s in enumerate(shapes)]
        jitted = jax.jit(fn)
        kind = _kind(jitted.lower(*args).compile().as_text())
        try:
            jitted(*args).block_until_ready()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                jitted(*args).block_until_ready()
                best = min(best, time.perf_counter() - t0)
            rows.append((name, kind, flops / best / 1e9))
        except Exception as e:  # the LOOSE form: reported, not raised
            rows.append((name, f"{kind}: {str(e).splitlines()[0][:60]}", float("nan")))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--onednn", action="store_true", help="run with --xla_cpu_use_onednn=true")
    p.add_argument("--both", action="store_true", help="default flags, then oneDNN (children)")
    args = p.parse_args()
    if args.both:
        for extra in ([], ["--onednn"]):
            subprocess.run([sys.executable, __file__, *extra], check=True)
        return
    if args.onednn:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_onednn=true").strip()
    import jax
    print(f"jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"{'form (bf16 operands, fp32 result)':42s} {'dot runs as':10s} GFLOP/s")
    for name, kind, gflops in run():
        print(f"{name:42s} {kind:10s} {gflops:7.0f}")


if __name__ == "__main__":
    main()
