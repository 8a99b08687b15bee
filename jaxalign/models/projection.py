"""Weight projections with their backward pass written out as two plain 2-D matmuls."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxalign.precision import dot_nt, dot_tn, matmul_precision, row_major, saveable


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _project(x: jax.Array, w: jax.Array, n_in: int, dtype) -> jax.Array:
    """x @ w over x's last `n_in` axes and w's first: a projection, computed like `_dot`.

    Its gradient is written out as two plain 2-D matmuls. Left to autodiff, XLA's CPU backend
    fed a weight gradient by transposing the (tokens, F) activation gradient with the SiLU
    backward fused in, a slow strided copy (1.5 s of a 13 s SmolLM2 SFT step in one such
    copy); written out, a SmolLM2-sized MLP layer ran forward, remat and backward in 0.13 s
    instead of 0.22 s, with the same gradients (docs/bench/README.md)."""
    return jnp.tensordot(row_major(x), row_major(w), axes=n_in, precision=matmul_precision(dtype),
                         preferred_element_type=jnp.float32).astype(dtype)


def _project_fwd(x, w, n_in, dtype):
    return _project(x, w, n_in, dtype), (x, w)


def _project_bwd(n_in, dtype, res, dy):
    x, w = res
    k = math.prod(w.shape[:n_in])
    x2, w2 = x.reshape(-1, k), w.reshape(k, -1)
    dy2 = dy.reshape(-1, w2.shape[1])
    kw = dict(precision=matmul_precision(dtype), preferred_element_type=jnp.float32)
    # In bf16 on CPU both take the forms its fast kernel runs (jaxalign.precision.row_major_dots).
    dx = dot_nt(dy2, w2, **kw).astype(x.dtype).reshape(x.shape)
    dw = dot_tn(x2, dy2, **kw).astype(w.dtype).reshape(w.shape)
    return dx, dw


_project.defvjp(_project_fwd, _project_bwd)


def project(x: jax.Array, w: jax.Array, n_in: int, dtype, name: str | None = "proj") -> jax.Array:
    """x @ w in `dtype` with fp32 accumulation; the result is tagged `name` for the remat
    policies that save projections (None: not tagged, so recomputed under them)."""
    y = _project(x.astype(dtype), w.astype(dtype), n_in, jnp.dtype(dtype))
    return y if name is None else saveable(y, name)
