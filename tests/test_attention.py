"""The blocked flash-style causal attention (`jaxalign.models.attention`) against the plain
formula softmax(q k^T * scale + mask) v written out naively here, and against
`jax.nn.dot_product_attention` (XLA's implementation, which takes the same boolean mask and
grouped heads): values and gradients (dq, dk, dv) for every mask the model builds (causal,
packed segments, left / right padding, shared-prefix branches, sliding windows), grouped
(GQA), multi-query (MQA) and plain heads, several block plans and lengths (including lengths
that are not a multiple of the block), fp32 tightly and bf16 loosely. Also: the backward
keeps O(T) (the output and the log-sum-exp), not the O(T^2) probabilities."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models import attention

H = 16
SCALE = H ** -0.5


def _naive(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """softmax(q k^T * scale + mask) v in fp32, kv heads repeated, no blocks, no tricks."""
    N, K = q_BTNH.shape[2], k_BSKH.shape[2]
    q, k, v = (x.astype(jnp.float32) for x in (q_BTNH, k_BSKH, v_BSKH))
    k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
    s_BNTS = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") * SCALE
    s_BNTS = jnp.where(mask_BTS[:, None], s_BNTS, jnp.finfo(jnp.float32).min)
    p_BNTS = jax.nn.softmax(s_BNTS, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p_BNTS, v, precision="highest")


@jax.jit
def _xla(q, k, v, mask_BTS):
    with jax.default_matmul_precision("highest"):
        return jax.nn.dot_product_attention(q, k, v, mask=mask_BTS[:, None], scale=SCALE,
                                            implementation="xla")


def _blocked(q, k, v, mask_BTS, blocks):
    return attention.causal_attention(q, k, v, mask_BTS, blocks, jnp.dtype(q.dtype), SCALE)


# ----------------------------------------------------------------------------- masks

def _causal(B, T):
    return np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)).copy()


def _from_segments(seg_BT):
    """Causal within a segment, 0 = padding (sees nothing, seen by nobody)."""
    T = seg_BT.shape[1]
    same = (seg_BT[:, :, None] == seg_BT[:, None, :]) & (seg_BT[:, None, :] > 0)
    return np.tril(np.ones((T, T), bool))[None] & same


def _masks(B, T, rng):
    """name -> (B, T, T) bool mask, one per structure the model builds."""
    seg = np.ones((B, T), np.int32)
    packed = seg.copy()
    for b in range(B):                      # 2-3 packed segments, a padded tail in row 0
        cuts = sorted(rng.choice(np.arange(1, T), 2, replace=False))
        packed[b, cuts[0]:cuts[1]], packed[b, cuts[1]:] = 2, 3
    packed[0, T - T // 7:] = 0
    left, right = seg.copy(), seg.copy()
    left[0, :T // 3], left[1:, :T // 5] = 0, 0      # left padding across block boundaries
    right[0, T - T // 3:], right[1:, T - 3:] = 0, 0
    # Shared-prefix rows [prompt | chosen | rejected] (llama.Llama, branch_ids_BT): branch b > 0
    # sees the prompt (branch 0) and itself.
    p, c = T // 4, T // 4 + (T - T // 4) // 2
    branch = np.zeros((B, T), np.int32)
    branch[:, p:c], branch[:, c:] = 1, 2
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    pos = np.arange(T)[None].repeat(B, 0)
    window = (pos[:, :, None] - pos[:, None, :]) < max(3, T // 5)
    return {"causal": _causal(B, T), "packed": _from_segments(packed),
            "left_pad": _from_segments(left), "right_pad": _from_segments(right),
            "branches": _causal(B, T) & visible, "window": _causal(B, T) & window,
            "window_packed": _from_segments(packed) & window}


def _inputs(B, T, N, K, dtype, seed=0):
    kq, kk, kv, ko = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, N, H), jnp.float32) * 1.5
    k = jax.random.normal(kk, (B, T, K, H), jnp.float32) * 1.5
    v = jax.random.normal(kv, (B, T, K, H), jnp.float32)
    dout = jax.random.normal(ko, (B, T, N, H), jnp.float32)
    return [x.astype(dtype) for x in (q, k, v)], dout


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(fn, q, k, v, mask, dout):
    """fn(q, k, v, mask) and the gradient of <fn(q, k, v, mask), dout> (fp32), on the rows
    with a visible key (softmax over nothing is undefined; the blocked form gives zeros).
    The mask is an argument: one program per form, plan and shape serves every mask."""
    live = mask.any(-1)[:, :, None, None]
    dout = jnp.where(live, dout, 0.0)

    def f(q, k, v):
        out = jnp.where(live, fn(q, k, v, mask).astype(jnp.float32), 0.0)
        return jnp.sum(out * dout), out
    (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return out, [g.astype(jnp.float32) for g in grads]


def _close(got, want, tol, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err <= tol, f"{what}: max error {err:.3g} (relative to max {np.abs(want).max():.3g}) > {tol}"


# name: (T, query_block, key_block, loop); None: what `plan` picks for that length.
PLANS = {
    "one_block": (40, None, None, None),
    "short_default": (200, None, None, None),   # 4 query blocks of 64 (the last 8), one key piece each
    "square_32": (96, 32, 32, False),           # a multiple of the block
    "square_48_ragged": (130, 48, 48, False),   # ragged last block
    "rect_40x24": (150, 40, 24, False),         # key blocks smaller than query blocks, unaligned
    "rect_24x64": (150, 24, 64, False),         # larger key blocks, clipped at each diagonal
    "loop_32_ragged": (150, 32, 32, True),      # key blocks below the diagonal in a fori_loop
    "long_default": (1100, None, None, None),   # the long plan: 512-square blocks looped, ragged tail
}
HEADS = {"gqa": (4, 2), "mqa": (3, 1), "mha": (2, 2)}


def _plan(T, qb, kb, loop=None):
    return attention.plan(T, qb, kb, loop)


def test_plan_skips_the_upper_triangle_and_covers_the_lower():
    for T, qb, kb, loop in list(PLANS.values()) + [(256, None, None, None),
                                                    (4096, None, None, None), (7, 3, 2, False)]:
        blocks = _plan(T, qb, kb, loop).blocks
        seen = np.zeros((T, T), int)
        for (a, e), keys in blocks:
            for c, d in keys:
                assert d <= e, f"T={T}: key block [{c}, {d}) beyond its query block's end {e}"
                seen[a:e, c:d] += 1
        lower = np.tril(np.ones((T, T), bool))
        assert seen[lower].min() == 1 and seen.max() == 1, f"T={T}: lower triangle not tiled once"
    short = _plan(256, None, None)
    assert len(short.blocks) == 4 and not short.loop           # short rows: as before the flash form
    assert all(len(keys) == 1 for _, keys in short.blocks)
    long = _plan(4096, None, None)
    assert long.loop and len(long.blocks) == 8                 # 8 x 8 blocks, 36 computed
    assert sum(len(k) for _, k in long.blocks) == 36


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("heads", list(HEADS))
def test_fp32_equals_reference(plan_name, heads):
    """Every mask kind, values and dq / dk / dv within 1e-5 of the naive formula (and of
    jax.nn.dot_product_attention on the values)."""
    T, qb, kb, loop = PLANS[plan_name]
    N, K = HEADS[heads]
    B = 2 if T < 1000 else 1
    (q, k, v), dout = _inputs(B, T, N, K, jnp.float32, seed=T + N)
    blocked = functools.partial(_blocked, blocks=_plan(T, qb, kb, loop))
    masks = _masks(B, T, np.random.default_rng(T))
    if T >= 1000:   # the long plan is slow to compile on a shared 2-core CPU: three masks
        masks = {n: masks[n] for n in ("causal", "packed", "branches")}
    for name, mask in masks.items():
        m = jnp.asarray(mask)
        want, want_g = _value_and_grads(_naive, q, k, v, m, dout)
        got, got_g = _value_and_grads(blocked, q, k, v, m, dout)
        _close(got, want, 1e-5, f"{plan_name} {heads} {name}: out")
        for g, w, n in zip(got_g, want_g, ("dq", "dk", "dv")):
            _close(g, w, 1e-5, f"{plan_name} {heads} {name}: {n}")
        if name == "causal":
            _close(got, _xla(q, k, v, m), 1e-5, f"{plan_name} {heads}: vs dot_product_attention")


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("plan_name", ["short_default", "square_48_ragged", "rect_40x24",
                                       "loop_32_ragged"])
def test_bf16_close_to_fp32_reference(plan_name):
    """bf16 operands (fp32 accumulation): within bf16's rounding of the fp32 formula."""
    T, qb, kb, loop = PLANS[plan_name]
    (q, k, v), dout = _inputs(2, T, 4, 2, jnp.float32, seed=3)
    blocked = functools.partial(_blocked, blocks=_plan(T, qb, kb, loop))
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    for name, mask in _masks(2, T, np.random.default_rng(1)).items():
        m = jnp.asarray(mask)
        # The reference sees the same bf16-rounded inputs, in fp32.
        want, want_g = _value_and_grads(_naive, *(x.astype(jnp.float32) for x in (q16, k16, v16)),
                                        m, dout)
        got, got_g = _value_and_grads(blocked, q16, k16, v16, m, dout)
        _close(got, want, 2e-2, f"bf16 {plan_name} {name}: out")
        for g, w, n in zip(got_g, want_g, ("dq", "dk", "dv")):
            _close(g, w, 3e-2, f"bf16 {plan_name} {name}: {n}")


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_rows_without_keys_give_zeros_and_finite_gradients():
    """A padding query (no visible key) outputs zeros; a nonzero cotangent on it moves nothing."""
    B, T = 2, 100
    (q, k, v), dout = _inputs(B, T, 4, 2, jnp.float32)
    seg = np.ones((B, T), np.int32)
    seg[0, :30] = 0
    mask = jnp.asarray(_from_segments(seg))
    blocks = _plan(T, 32, 16, False)
    out = _blocked(q, k, v, mask, blocks)
    assert np.all(np.asarray(out)[0, :30] == 0)
    grads = jax.grad(lambda q, k, v: jnp.sum(_blocked(q, k, v, mask, blocks) * dout),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    assert np.all(np.asarray(grads[0])[0, :30] == 0)       # dq of padding rows
    assert np.all(np.asarray(grads[1])[0, :30] == 0)       # nobody sees the padding keys


def _saved_bytes(T):
    """Bytes the backward keeps from the forward (the residuals of jax.vjp), SmolLM2 heads."""
    B, N, K = 1, 9, 3
    q = jax.ShapeDtypeStruct((B, T, N, 64), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, K, 64), jnp.float32)
    mask = jnp.asarray(_causal(B, T))
    res = jax.eval_shape(lambda q, k, v: jax.tree.leaves(jax.vjp(
        lambda q, k, v: _blocked(q, k, v, mask, attention.plan(T)), q, k, v)[1]), q, kv, kv)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in res
               if x.shape != mask.shape)      # the mask is the caller's, shared by every layer


def test_backward_keeps_linear_memory():
    """Doubling T doubles what the backward keeps (out, lse and the inputs), not 4x."""
    small, large = _saved_bytes(1024), _saved_bytes(2048)
    assert large <= 2.05 * small, (small, large)
    assert large < 2048 * 9 * 64 * 4 * 6, large   # a few (T, N, H) arrays, no (T, T) one


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_remat_attn_saves_out_and_lse_only():
    """Under the "attn" remat policy the layer saves the attention's output and log-sum-exp
    (names 'attn') and no (T, T) array."""
    from jax.ad_checkpoint import print_saved_residuals  # noqa: F401 (documented API)
    from jaxalign.models.llama import _REMAT_POLICIES
    B, T, N, K = 1, 256, 4, 2
    (q, k, v), _ = _inputs(B, T, N, K, jnp.float32)
    mask = jnp.asarray(_causal(B, T))

    def layer(q, k, v):
        return jnp.sum(jnp.tanh(_blocked(jnp.sin(q), k, v, mask, attention.plan(T))))

    f = jax.checkpoint(layer, policy=_REMAT_POLICIES["attn"])
    _, vjp = jax.vjp(f, q, k, v)
    shapes = [x.shape for x in jax.tree.leaves(vjp)]
    assert not any(len(s) >= 2 and s[-1] == T and s[-2] in (T, T * N // K) for s in shapes
                   if s != mask.shape), shapes
    assert (B, T, N, H) in shapes and (B, K, T * N // K) in shapes, shapes
