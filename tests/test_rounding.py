"""Stochastic rounding of the weights a bf16 train step reads (`precision.stochastic_round`,
`train.stochastic_rounding`): unbiased, always one of the two bf16 neighbours, the same bits on
every device layout, and a train step whose forward sees updates that rounding to nearest hides."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign.precision import round_params, rounds_stochastically, stochastic_round
from jaxalign.train.step import init_state, make_eval_step, make_train_step


def _neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bf16 values just below and just above each fp32 value (by truncating its bits)."""
    bits = x.astype(np.float32).view(np.uint32)
    low = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    high = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    exact = (bits & np.uint32(0xFFFF)) == 0
    return low, np.where(exact, low, high)


def test_unbiased_and_always_a_neighbour():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.05, (64,)).astype(np.float32)
    x[:4] = [0.0, 1.0, -0.5, 0.0390625]                  # bf16 values: returned unchanged
    draws = np.stack([np.asarray(stochastic_round(jnp.asarray(x), jnp.uint32(s)))
                      for s in range(2000)])
    lo, hi = _neighbours(np.abs(x))
    mag = np.abs(draws)
    assert np.all((mag == lo) | (mag == hi)), "a draw is not one of the two bf16 neighbours"
    assert np.all(np.sign(draws) == np.sign(x)[None])
    np.testing.assert_array_equal(draws[:, :4], np.broadcast_to(x[:4], (2000, 4)))
    # The mean over draws is x, within the binomial noise of 2000 draws (one bf16 step each).
    step = hi - lo
    err = np.abs(draws.mean(0) - x)
    assert np.all(err <= 4 * step * np.sqrt(0.25 / 2000) + 1e-12), (err / np.maximum(step, 1e-30)).max()
    # Rounding to nearest is biased for values off the midpoint: the mean here is not.
    rtn = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
    assert np.abs(rtn - x).mean() > 5 * err.mean()


def test_special_values_and_independent_elements():
    x = jnp.asarray([np.inf, -np.inf, np.nan, 3e38, -1e-40], jnp.float32)
    y = np.asarray(stochastic_round(x, jnp.uint32(7)))
    assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2])
    assert np.isfinite(y[4]) and y[4] <= 0
    # Equal values in one array round independently (the hash reads each element's index).
    same = np.asarray(stochastic_round(jnp.full((4096,), 0.0501, jnp.float32), jnp.uint32(3)))
    lo, hi = _neighbours(np.float32([0.0501]))
    frac_up = (same == hi[0]).mean()
    expected = (0.0501 - lo[0]) / (hi[0] - lo[0])
    assert abs(frac_up - expected) < 0.05, (frac_up, expected)


def test_same_bits_on_every_device_layout():
    from jax.sharding import NamedSharding, PartitionSpec as P
    x = jax.random.normal(jax.random.key(0), (16, 24, 8)) * 0.05
    whole = np.asarray(jax.jit(stochastic_round)(x, jnp.uint32(11)))
    mesh = jax.make_mesh((4, 2), ("a", "b"), devices=jax.devices()[:8])
    for spec in (P("a", "b"), P(None, "a", "b"), P(("a", "b"))):
        sh = NamedSharding(mesh, spec)
        out = jax.jit(stochastic_round, in_shardings=(sh, None), out_shardings=sh)(
            jax.device_put(x, sh), jnp.uint32(11))
        np.testing.assert_array_equal(np.asarray(out), whole)


def test_round_params_skips_norms_and_non_fp32():
    params = {"embed": jnp.full((8, 4), 0.0501), "layers": {
        "attn_norm": {"scale": jnp.full((2, 4), 1.0001)},
        "mlp": {"up": jnp.full((2, 4, 8), 0.0501), "up_bias": jnp.full((2, 8), 0.0501)},
        "half": jnp.full((4, 4), 0.0501, jnp.bfloat16)}}
    out = round_params(params, jnp.uint32(5))
    np.testing.assert_array_equal(out["layers"]["attn_norm"]["scale"], params["layers"]["attn_norm"]["scale"])
    assert out["layers"]["half"] is params["layers"]["half"]
    for leaf in (out["embed"], out["layers"]["mlp"]["up"], out["layers"]["mlp"]["up_bias"]):
        assert leaf.dtype == jnp.float32
        np.testing.assert_array_equal(leaf, leaf.astype(jnp.bfloat16).astype(jnp.float32))
    # Each leaf its own stream: two equal leaves of one shape are not rounded alike.
    twin = round_params({"a": jnp.full((64, 64), 0.0501), "b": jnp.full((64, 64), 0.0501)}, jnp.uint32(5))
    assert not np.array_equal(twin["a"], twin["b"])


def test_only_bf16_compute_over_fp32_params_rounds():
    assert rounds_stochastically("bfloat16", "float32", True)
    assert not rounds_stochastically("bfloat16", "float32", False)
    assert not rounds_stochastically("float32", "float32", True)
    assert not rounds_stochastically("bfloat16", "bfloat16", True)


def _linear_problem():
    """A least-squares fit whose forward casts its weight to bf16, as the models do. The
    weight sits where a bf16 step is 2^-8 (~0.0039) and the learning rate is 1e-4: every Adam
    update is far below half a bf16 step."""
    rng = np.random.default_rng(1)
    w_true = rng.normal(0, 1, (16, 4)).astype(np.float32)
    x = rng.normal(0, 1, (256, 16)).astype(np.float32)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(x @ (0.75 + 0.01 * w_true))}

    def loss_fn(p, frozen, b, rng):
        pred = jnp.dot(b["x"].astype(jnp.bfloat16), p["w"].astype(jnp.bfloat16),
                       preferred_element_type=jnp.float32)
        loss = jnp.mean((pred - b["y"]) ** 2)
        return loss, {"loss": loss, "weight": jnp.float32(1.0)}
    return {"w": jnp.full((16, 4), 0.75, jnp.float32)}, batch, loss_fn


@pytest.mark.parametrize("rounded", [False, True])
def test_train_step_sees_updates_below_half_a_bf16_step(rounded):
    params, batch, loss_fn = _linear_problem()
    opt = optax.adam(1e-4)
    step = jax.jit(make_train_step(loss_fn, opt, lambda s: 1e-4, round_weights=rounded))
    evaluate = jax.jit(make_eval_step(loss_fn, round_weights=rounded))
    state = init_state(params, opt, seed=0)
    first = float(evaluate(state.params, None, batch)["loss_sum"])
    for _ in range(12):
        state, _ = step(state, None, batch)
    last = float(evaluate(state.params, None, batch)["loss_sum"])
    moved = float(jnp.abs(state.params["w"] - 0.75).max())
    assert moved < 0.0039 / 2   # the fp32 weights moved less than half a bf16 step ...
    if rounded:
        assert last < 0.97 * first, (first, last)   # ... which the rounded forward sees
    else:
        assert last == first                        # ... and rounding to nearest hides
