"""Matmul precision and soft-capping, shared by the model and the losses (which must not import the model)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def matmul_precision(dtype) -> jax.lax.Precision:
    """HIGHEST for fp32 operands, the backend's default otherwise.

    GPUs otherwise run fp32 dots as TF32 (XLA's default), which put SmolLM2-shaped logits
    1.5e-2 away from transformers' fp32 on an H200; on CPU both give the same code."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def row_major_dots(dtype) -> bool:
    """Whether a matmul over `dtype` operands must be written in the one form XLA's CPU backend
    runs in 16 bits: both operands fresh row-major arrays, the left one contracting its last
    axis (x @ w, or x @ w^T as a dot_general that contracts both last axes).

    On CPU a bf16 x bf16 -> fp32 dot runs in YNNPACK's fast kernel (AVX512-BF16 / AMX) only in
    that form; any other form (a transposed operand, x^T @ g over the tokens) is upcast to two
    fp32 copies and an fp32 dot, 4-7x slower, and where XLA folds a transpose into such a dot
    after that choice (inside a loop body), the generic runtime refuses it ("Unsupported
    element type for DotThunk::Execute: BF16 x BF16 = F32"); scripts/bf16_dot_probe.py shows
    each form. GPUs take every form as it is, and fp32 keeps the forms it was tuned with."""
    return jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == "cpu"


def materialize(x: jax.Array) -> jax.Array:
    """`x` (typically a transpose) computed into its own row-major buffer.

    XLA gives a transpose the layout that makes it free (the operand's bytes, read column-major)
    or folds it into the dot that reads it, either of which takes the dot off the fast bf16
    path (`row_major_dots`). A unit axis added in front of an optimization barrier gives the
    value a shape of its own, so the transposed copy is made (a cheap memory pass) before the
    dot reads it. The unit axis is last, so a sharded axis stays where it was."""
    return jax.lax.optimization_barrier(x[..., None])[..., 0]


def row_major(x: jax.Array) -> jax.Array:
    """`materialize(x)` where dots over its dtype need row-major operands, else x unchanged.
    Free when x already is a row-major buffer (the unit axis is a bitcast)."""
    return materialize(x) if row_major_dots(x.dtype) else x


def dot_tn(x_MK: jax.Array, g_MN: jax.Array, **kw) -> jax.Array:
    """x^T @ g contracting the leading (token) axis of two 2-D arrays: a weight gradient.

    In bf16 on CPU one operand must be copied out transposed (`row_major_dots`): the smaller
    one. Transposing g instead of x costs that copy plus one of the (N, K) result, and takes
    x as it comes, row-major: SmolLM2's down projection (x: 2048 x 1536 MLP activations
    recomputed inside the transposing copy, g: 2048 x 576) and its k / v projections (g:
    2048 x 192) take this form."""
    if row_major_dots(x_MK.dtype):
        (M, K), N = x_MK.shape, g_MN.shape[1]
        if M * N + 2 * K * N < M * K:   # the fp32 result's transpose counts twice (4 bytes)
            return materialize(materialize(jnp.dot(materialize(g_MN.T), materialize(x_MK), **kw)).T)
        return jnp.dot(materialize(x_MK.T), materialize(g_MN), **kw)
    return jnp.dot(x_MK.T, g_MN, **kw)


def dot_nt(g_MN: jax.Array, w_KN: jax.Array, **kw) -> jax.Array:
    """g @ w^T of two 2-D arrays: an input gradient. In bf16 on CPU one dot_general over both
    last axes of row-major operands, the form its fast kernel takes without a transposed copy."""
    if row_major_dots(g_MN.dtype):
        return jax.lax.dot_general(materialize(g_MN), materialize(w_KN), (((1,), (1,)), ((), ())),
                                   **kw)
    return jnp.dot(g_MN, w_KN.T, **kw)
@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _as_bits(x: jax.Array, name: str) -> jax.Array:
    return x


@_as_bits.defjvp
def _as_bits_jvp(name, primals, tangents):
    (x,), (t,) = primals, tangents
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    return jax.lax.bitcast_convert_type(checkpoint_name(bits, name), x.dtype), t


def saveable(x: jax.Array, name: str) -> jax.Array:
    """`checkpoint_name(x, name)`, the value a remat policy keeps for the backward pass. In bf16
    on CPU the kept value is x's bits as uint16 (the tangent passes through unchanged).

    A layer scan stacks what it keeps into (layers, ...) buffers, one dynamic-update-slice a
    layer. XLA's CPU backend has no bf16 dynamic-update-slice: it upcasts the whole stacked
    buffer to fp32 and back around each update, so every layer copies all layers' saved
    activations (quadratic in depth; scripts/profile_step.py showed these fusions at 22% of a
    bf16 SmolLM2 step's op time). A 16-bit integer buffer is updated in place."""
    if not row_major_dots(x.dtype) or x.dtype.itemsize != 2:
        return checkpoint_name(x, name)
    return _as_bits(x, name)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention-logit and final-logit soft-capping); x itself
    when `cap` is None, adding no op."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def residual_dtype(dt) -> jnp.dtype:
    """The dtype of the residual stream (the sum every block adds into) for compute dtype `dt`:
    fp32 under a 16-bit compute dtype, as under PyTorch autocast. Every block adds its bf16
    branch output into an fp32 sum and the norms read fp32; only the projections' inputs are
    cast. A bf16 residual learned 3-13% more slowly than fp32 on SmolLM2 SFT over the first
    14 steps (docs/bench/2026-12-06_cpu_bf16_vs_fp32.txt; the rest of that gap was the weights'
    rounding, `stochastic_round`)."""
    return jnp.dtype(jnp.float32) if jnp.dtype(dt).itemsize < 4 else jnp.dtype(dt)


def decode_cast(a: jax.Array, dtype) -> jax.Array:
    """A weight in the decode dtype: matrices only. Vectors (norm scales, biases: few bytes)
    keep their dtype, as the training forward reads them against its fp32 residual, whose
    start is the embedding rounded to the compute dtype (what a decode reading cast
    embeddings sees), so that sampler and trainer log-probs agree."""
    return a if dtype is None or a.ndim < 2 else a.astype(dtype)


def _mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer hash (murmur3's finaliser): every input bit flips each output bit
    with probability ~1/2. Cheap enough to fuse into the cast it feeds."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def stochastic_round(x: jax.Array, seed: jax.Array) -> jax.Array:
    """fp32 `x` rounded to a bf16 value (returned as fp32), down or up at random with the
    probabilities that make the expected result `x` itself.

    Round-to-nearest hides every change of a weight smaller than half its bf16 spacing: at
    lr 2e-5 an Adam step moves a weight of size ~0.05 by a tenth of that, so a bf16 forward
    keeps seeing the old weight for several steps. Rounded stochastically, the forward sees
    the fp32 master's value on average. The random bits are a hash of (element index, seed),
    computed where the cast happens: no pass over a random array (threefry over SmolLM2's
    weights cost 1.3 s a step on 2 CPU cores; the hash costs nothing beside the cast), and
    the same bits on every device layout (the index is the element's global position)."""
    idx = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    noise = _mix32(idx * jnp.uint32(0x9E3779B1) + seed) >> 16   # the 16 bits bf16 drops
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    # Adding below the kept bits carries into them with probability (dropped part) / 2^16;
    # on the magnitude, so negative values round symmetrically. inf stays inf, NaN stays NaN.
    return jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)


def rounds_stochastically(compute_dtype, param_dtype, enabled: bool) -> bool:
    """Whether a train step reads its trainable matrices through `stochastic_round`: bf16
    compute over fp32 params, unless `train.stochastic_rounding` is off."""
    return (enabled and jnp.dtype(compute_dtype) == jnp.bfloat16
            and jnp.dtype(param_dtype) == jnp.float32)


def path_name(path) -> str:
    """A param's tree path as "layers/attn_norm/scale": the names the rules read (which
    weights decay, which the forward reads in fp32)."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def round_params(params, seed: jax.Array):
    """`stochastic_round` of every fp32 weight in `params` (each its own stream) that the
    forward casts to the compute dtype: all but the norm scales, which it reads in fp32
    against the residual stream (`residual_dtype`), so rounding them would only add noise."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)

    def rounded(i, path, a):
        if a.dtype != jnp.float32 or "norm" in path_name(path):
            return a
        return stochastic_round(a, _mix32(seed + jnp.uint32(i * 0x632BE5AB % 2**32)))
    return jax.tree.unflatten(treedef, [rounded(i, path, a) for i, (path, a) in enumerate(leaves)])
