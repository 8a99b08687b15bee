"""Model fidelity (the contract in docs/architecture.md): our logits against transformers' LlamaForCausalLM.

Tiny random models cover the architecture switches (MHA / GQA / MQA, tied head, biases,
RoPE scaling types, an explicit head_dim) with left and right padding, scanned and
unrolled layers; packing, remat and bf16 compute are checked against the fp32 forward;
the real SmolLM2-135M closes the loop on real text.

One jit compile per (config, shape): `_logits` and `_loss_and_grad` take the config as a
static argument, and every test in a family shares the same batch shape.
"""

import copy

import numpy as np
import pytest
import torch

import chex
import jax
import jax.numpy as jnp

from conftest import make_tiny_hf
from jaxalign.config import ConfigError
from jaxalign.convert import hf
from jaxalign.models import attention, functional, llama
from jaxalign.models.llama import rope_inv_freq

FP32_TOL = 1e-4  # the model-fidelity contract

# Small original context so that llama3 scaling changes most frequencies at T=24.
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=16)
LINEAR = dict(rope_type="linear", rope_theta=10000.0, factor=4.0)

VARIANTS = {
    # 4 query heads over 2 kv heads, separate lm_head, plain RoPE.
    "gqa": dict(),
    "mha_tied_bias": dict(num_key_value_heads=4, tie_word_embeddings=True,
                          attention_bias=True, mlp_bias=True),
    # head_dim 24 != hidden / heads (16): q_proj maps 64 -> 96.
    "mqa_llama3_headdim": dict(num_key_value_heads=1, head_dim=24, rope_parameters=LLAMA3),
    "gqa_linear_tied": dict(tie_word_embeddings=True, rope_parameters=LINEAR, num_hidden_layers=3),
}

B, T = 3, 24
LEFT_PAD, RIGHT_PAD = 5, 7


def padded_batch(seed=0, vocab=96):
    """Row 0 left-padded, row 1 right-padded, row 2 full. Pad id 0 (never a real token)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    mask[0, :LEFT_PAD] = 0
    mask[1, T - RIGHT_PAD:] = 0
    tokens = np.where(mask > 0, rng.integers(3, vocab, (B, T)), 0).astype(np.int32)
    return tokens, mask


def hf_positions(mask):
    """What transformers' generate() passes: cumsum(mask) - 1, clipped at 0."""
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


def hf_logits(model, tokens, mask):
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(hf_positions(mask), dtype=torch.long))
    return out.logits.float().numpy()


def _logits_impl(cfg, params, tokens_BT, segment_ids_BT):
    return functional.apply(cfg, params, tokens_BT, segment_ids_BT=segment_ids_BT)[0]


_logits = jax.jit(_logits_impl, static_argnums=0)


def ours(cfg, params, tokens, mask):
    return np.asarray(_logits(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))


def max_diff_at(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, cfg, params, torch model, HF reference logits on the padded batch)."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    model = make_tiny_hf(path, seed=len(name), **VARIANTS[name])
    cfg, params, _ = hf.load(path)
    tokens, mask = padded_batch()
    return name, cfg, params, model, hf_logits(model, tokens, mask)


# Every variant scanned; unrolled layers run the same Block code in a Python loop, so two
# variants (one with every bias, one with MQA + head_dim + llama3) cover the loop's
# indexing of stacked params while keeping compiles down.
PARITY_CASES = [(name, True) for name in VARIANTS] + [
    ("mha_tied_bias", False), ("mqa_llama3_headdim", False)]


@pytest.mark.parametrize("variant,scan_layers", PARITY_CASES, indirect=["variant"],
                         ids=[f"{n}-{'scan' if s else 'unrolled'}" for n, s in PARITY_CASES])
def test_fp32_logits_match_transformers(variant, scan_layers):
    name, cfg, params, _, ref = variant
    tokens, mask = padded_batch()
    got = ours(cfg.replace(scan_layers=scan_layers), params, tokens, mask)
    diff = max_diff_at(got, ref, mask)
    scale = float(np.abs(ref[mask > 0]).max())
    assert scale > 3, f"{name}: logits of scale {scale} make a 1e-4 bound meaningless"
    assert diff <= FP32_TOL, (f"{name} (scan_layers={scan_layers}): max |ours - transformers| = "
                              f"{diff:.3g} at real tokens > {FP32_TOL} (logit scale {scale:.2f})")
    # Per padding kind, so a failure says which one broke.
    for row, kind in ((0, "left padding"), (1, "right padding"), (2, "no padding")):
        d = max_diff_at(got[row], ref[row], mask[row])
        assert d <= FP32_TOL, f"{name}: {kind} row differs by {d:.3g}"


@pytest.mark.parametrize("variant", ["mqa_llama3_headdim", "gqa_linear_tied"], indirect=True)
def test_rope_scaling_really_changes_the_model(variant):
    """The scaled-RoPE variants must differ from plain RoPE on the test batch, or the
    parity above would not be testing the scaling at all."""
    name, cfg, _, model, ref = variant
    assert cfg.rope_type != "default"
    assert not np.allclose(rope_inv_freq(cfg), rope_inv_freq(cfg.replace(rope_type="default")))
    from transformers import LlamaForCausalLM
    plain_cfg = model.config.__class__.from_dict(
        {**model.config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}})
    plain = LlamaForCausalLM(plain_cfg).eval()
    plain.load_state_dict(model.state_dict())
    tokens, mask = padded_batch()
    diff = max_diff_at(hf_logits(plain, tokens, mask), ref, mask)
    assert diff > 0.05, f"{name}: {cfg.rope_type} scaling changes logits by only {diff:.3g}"


# ----------------------------------------------------------------------------- packing

@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    path = tmp_path_factory.mktemp("gqa_single")
    model = make_tiny_hf(path, seed=11)
    cfg, params, _ = hf.load(path)
    return cfg, params, model


PACKED_SEGMENTS = [  # per row: segment lengths; the rest of the row is padding (id 0)
    [3, 5, 9, 4],
    [1, 11, 6],
    [T],
]


def test_packed_rows_equal_separate_forwards(gqa):
    cfg, params, model = gqa
    rng = np.random.default_rng(3)
    tokens = np.zeros((B, T), np.int32)
    seg = np.zeros((B, T), np.int32)
    pieces = []  # (row, start, length)
    for row, lengths in enumerate(PACKED_SEGMENTS):
        start = 0
        for s, n in enumerate(lengths, 1):
            tokens[row, start:start + n] = rng.integers(3, cfg.vocab_size, n)
            seg[row, start:start + n] = s
            pieces.append((row, start, n))
            start += n
    packed = ours(cfg, params, tokens, seg)

    # Unpacked: each segment alone at the start of its own row, right-padded. Same batch
    # shape (B, T) chunks, so no extra compile.
    for i in range(0, len(pieces), B):
        chunk = pieces[i:i + B]
        alone = np.zeros((B, T), np.int32)
        alone_mask = np.zeros((B, T), np.int32)
        for j, (row, start, n) in enumerate(chunk):
            alone[j, :n] = tokens[row, start:start + n]
            alone_mask[j, :n] = 1
        single = ours(cfg, params, alone, alone_mask)
        reference = hf_logits(model, alone, alone_mask)
        for j, (row, start, n) in enumerate(chunk):
            got = packed[row, start:start + n]
            d = float(np.abs(got - single[j, :n]).max())
            assert d <= 1e-5, f"segment at row {row} [{start}:{start + n}] differs from its own forward by {d:.3g}"
            d = float(np.abs(got - reference[j, :n]).max())
            assert d <= FP32_TOL, f"segment at row {row} [{start}:{start + n}] differs from transformers by {d:.3g}"


def test_default_positions_restart_per_segment():
    seg = jnp.array([[0, 0, 1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 0, 0, 0, 0]])
    pos = functional.positions_from_segments(seg)
    np.testing.assert_array_equal(pos, [[0, 1, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1, 2, 3]])


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_blocked_causal_attention_long_rows(gqa, monkeypatch):
    """Rows of 160 tokens run the causal attention in query blocks (64, 64, 32), each
    against the keys up to its own end: logits equal transformers' on every real token with
    left padding, right padding and packed segments, and loss and gradients equal those of
    one unblocked attention over the whole row."""
    cfg, params, model = gqa
    TL = 160
    rng = np.random.default_rng(8)
    mask = np.ones((3, TL), np.int32)
    mask[0, :37] = 0                       # left padding across the first block boundary
    mask[1, 101:] = 0                      # right padding
    seg = mask.copy()
    seg[2, 70:] = 2                        # row 2: two packed segments, the second from 70
    tokens = np.where(mask > 0, rng.integers(3, cfg.vocab_size, (3, TL)), 0).astype(np.int32)
    assert TL >= 2 * attention._MIN_QUERY_BLOCK, "rows too short to be split into query blocks"

    blocked = ours(cfg, params, tokens, seg)
    reference = hf_logits(model, tokens[:2], mask[:2])
    assert max_diff_at(blocked[:2], reference, mask[:2]) <= FP32_TOL
    for a, b in ((0, 70), (70, TL)):       # each packed segment alone, from position 0
        alone = hf_logits(model, tokens[2:3, a:b], mask[2:3, a:b])
        assert float(np.abs(blocked[2, a:b] - alone[0]).max()) <= FP32_TOL

    (loss, _), grads = _loss_and_grad(cfg, params, tokens, seg)
    monkeypatch.setattr(attention, "_MIN_QUERY_BLOCK", TL)   # one block: the plain attention
    unblocked = jax.jit(jax.value_and_grad(_loss_impl, argnums=1, has_aux=True), static_argnums=0,
                        compiler_options={"xla_backend_optimization_level": 0})  # a fresh trace
    (ref_loss, _), ref_grads = unblocked(cfg, params, tokens, seg)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- remat

def _loss_impl(cfg, params, tokens_BT, segment_ids_BT):
    """Mean next-token cross-entropy over real tokens."""
    logits = functional.apply(cfg, params, tokens_BT, segment_ids_BT=segment_ids_BT)[0]
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]
    weight = ((segment_ids_BT[:, 1:] > 0) & (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]))
    return jnp.sum(nll * weight) / jnp.sum(weight), logits


# Remat is a JAX-level rewrite (the same HLO reaches XLA whatever the LLVM level), so these
# gradient programs are compiled at LLVM -O0: 2-3x faster to compile on this 2-core CPU.
_loss_and_grad = jax.jit(jax.value_and_grad(_loss_impl, argnums=1, has_aux=True), static_argnums=0,
                         compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def no_remat_grads(gqa):
    """The reference: scanned layers, no remat. (Unrolled layers give bitwise the same
    loss, logits and gradients here, so one reference serves both.)"""
    cfg, params, _ = gqa
    tokens, mask = padded_batch(seed=5)
    return _loss_and_grad(cfg, params, tokens, mask)


# Both policies under scan; the unrolled loop differs only in prevent_cse, checked once.
@pytest.mark.parametrize("remat,scan_layers", [("full", True), ("dots", True), ("attn", True),
                                                ("full", False)],
                         ids=["full-scan", "dots-scan", "attn-scan", "full-unrolled"])
def test_remat_matches_no_remat(gqa, no_remat_grads, remat, scan_layers):
    cfg, params, _ = gqa
    tokens, mask = padded_batch(seed=5)
    (loss, logits), grads = _loss_and_grad(cfg.replace(remat=remat, scan_layers=scan_layers),
                                           params, tokens, mask)
    (ref_loss, ref_logits), ref_grads = no_remat_grads
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(logits, ref_logits, rtol=0, atol=1e-5)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)
    # The gradient is not trivially zero, and the remat config really reached the program.
    assert float(jnp.abs(grads["layers"]["attn"]["q"]).max()) > 1e-4
    remat_cfg = cfg.replace(remat=remat, scan_layers=scan_layers)
    jaxpr = str(jax.make_jaxpr(lambda p: _loss_impl(remat_cfg, p, tokens, mask)[0])(params))
    assert "remat" in jaxpr, f"remat={remat!r} left no remat in the traced forward"


@pytest.mark.parametrize("up_to", [0, 8, 64])
def test_short_rows_run_unrolled_without_remat(gqa, no_remat_grads, up_to):
    """`unroll_up_to`: rows of at most that many tokens run the layers unrolled and without
    remat, longer ones scanned with the config's remat; the same loss and gradients."""
    cfg, params, _ = gqa
    tokens, mask = padded_batch(seed=5)
    c = cfg.replace(remat="attn", scan_layers=True, unroll_up_to=up_to)
    (loss, _), grads = _loss_and_grad(c, params, tokens, mask)
    (ref_loss, _), ref_grads = no_remat_grads
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(lambda p: _loss_impl(c, p, tokens, mask)[0])(params))
    short = tokens.shape[1] <= up_to
    assert ("remat" in jaxpr) != short, (up_to, tokens.shape)


# ----------------------------------------------------------------------------- bf16

# bf16 keeps 8 mantissa bits (~0.4% per rounding). Measured on random tiny models with
# logits up to ~6-7: max |bf16 ours - fp32 transformers| 0.18-0.31 (2.5-5% of the largest
# logit; 0.28 at scale 6.0 for this test's model), about the same as transformers itself
# run in bf16 (0.17-0.29; 0.27 here). Bound: 8% of the logit scale, and no more than 1.5x
# transformers' own bf16 error plus 0.05.
BF16_REL_TOL = 0.08


def test_bf16_compute_close_to_fp32_transformers(gqa):
    """dtype='bfloat16' (activations and matmul inputs; fp32 accumulation, softmax and
    norms) with the fp32 master params that training keeps."""
    cfg, params, model = gqa
    tokens, mask = padded_batch(seed=7)
    ref = hf_logits(model, tokens, mask)
    got = ours(cfg.replace(dtype="bfloat16"), params, tokens, mask)
    assert got.dtype == np.float32  # logits are always fp32
    scale = float(np.abs(ref[mask > 0]).max())
    diff = max_diff_at(got, ref, mask)
    torch_bf16 = hf_logits(copy.deepcopy(model).to(torch.bfloat16), tokens, mask)
    torch_diff = max_diff_at(torch_bf16, ref, mask)
    assert diff <= BF16_REL_TOL * scale, (
        f"bf16: max diff {diff:.3g} > {BF16_REL_TOL} x logit scale {scale:.2f}")
    assert diff <= 1.5 * torch_diff + 0.05, (
        f"bf16: max diff {diff:.3g}, transformers' own bf16 error {torch_diff:.3g}")
    real = mask > 0
    agree = float((got.argmax(-1) == ref.argmax(-1))[real].mean())
    assert agree >= 0.9, f"bf16 argmax agrees with fp32 at only {agree:.0%} of real tokens"


# ----------------------------------------------------------------------------- attention kernel

def test_cudnn_attention_needs_gpu_and_bf16(gqa):
    cfg, params, _ = gqa
    tokens, mask = padded_batch()
    if jax.default_backend() == "gpu":
        bad = cfg.replace(attention="cudnn", dtype="float32")
    else:
        bad = cfg.replace(attention="cudnn", dtype="bfloat16")
    with pytest.raises(ConfigError, match="model.attention: cudnn needs a GPU and dtype bfloat16"):
        ours(bad, params, tokens, mask)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU")
def test_cudnn_attention_matches_xla_attention(gqa):
    """Same bf16 model, the two attention kernels: logits and gradients on a batch with left
    padding, right padding and packed segments (scripts/device_check.sh runs this)."""
    cfg, params, _ = gqa
    tokens, mask = padded_batch(seed=9)
    seg = mask.copy()
    seg[2, T // 2:] = 2  # the full row becomes two packed segments
    tokens, seg = jnp.asarray(tokens), jnp.asarray(seg)
    (loss_x, logits_x), grads_x = _loss_and_grad(cfg.replace(dtype="bfloat16", attention="xla"),
                                                 params, tokens, seg)
    (loss_c, logits_c), grads_c = _loss_and_grad(cfg.replace(dtype="bfloat16", attention="cudnn"),
                                                 params, tokens, seg)
    real = np.asarray(seg) > 0
    scale = float(np.abs(np.asarray(logits_x)[real]).max())
    diff = float(np.abs(np.asarray(logits_c) - np.asarray(logits_x))[real].max())
    assert diff <= 0.03 * scale, f"cudnn vs xla logits differ by {diff:.3g} (scale {scale:.2f})"
    assert abs(float(loss_c) - float(loss_x)) <= 0.01 * abs(float(loss_x))
    for name in ("q", "k", "v", "o"):
        gx, gc = np.asarray(grads_x["layers"]["attn"][name]), np.asarray(grads_c["layers"]["attn"][name])
        rel = float(np.linalg.norm(gc - gx) / np.linalg.norm(gx))
        assert rel <= 0.05, f"grad of attn.{name}: cudnn vs xla relative difference {rel:.3g}"


# ----------------------------------------------------------------------------- SmolLM2

PROMPTS = [
    "The history of the Roman Empire spans more than a thousand years, from the founding of "
    "the city on the banks of the Tiber to the fall of Constantinople in 1453. Historians "
    "usually divide it into the Republic, the Principate and the Dominate, each with its own "
    "institutions, armies and ways of raising taxes from the provinces.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number using an iterative loop.\"\"\"\n"
    "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "if __name__ == '__main__':\n    for i in range(10):\n        print(i, fibonacci(i))\n",
    "Photosynthesis is the process by which green plants, algae and some bacteria convert "
    "light energy into chemical energy. During this process, carbon dioxide and water are "
    "combined to form glucose and oxygen, using the energy captured by chlorophyll. The "
    "light-dependent reactions take place in the thylakoid membranes, while the Calvin cycle "
    "runs in the stroma of the chloroplast.",
    "Dear hiring committee, I am writing to apply for the position of junior data engineer "
    "advertised on your website last week. Over the past two years I have built streaming "
    "pipelines, maintained a small warehouse and taught colleagues to write tests. I would "
    "welcome the chance to bring the same care to your team, and I have attached my resume "
    "together with two short references from former managers.",
]
# Measured 1.7e-4 (logits up to 40; 4 prompts of 69-82 tokens). Round-off, not a bug:
# against a float64 transformers forward ours is off by 1.6e-4 and transformers' fp32 by
# 7.3e-5; XLA:CPU's fp32 matmul accumulates ~2.6x more error than torch's on these shapes
# (1.0e-6 vs 4.0e-7 relative on 328x576 @ 576x1536). The margin is thin: a real bug
# shows up orders of magnitude larger, a different CPU may move the last digits.
SMOL_TOL = 2e-4


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    cfg, params, hf_config = hf.load(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return cfg, params, hf_config, model, tokenizer


@pytest.mark.slow
def test_smollm2_config(smollm2):
    cfg, params, hf_config, _, _ = smollm2
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (576, 1536, 49152)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert cfg.rope_type == "default" and cfg.rope_theta == 100000.0
    assert cfg.rms_norm_eps == hf_config["rms_norm_eps"]
    assert params["layers"]["attn"]["k"].shape == (30, 576, 3, 64)
    assert hf.num_params(params) == 134_515_008


@pytest.mark.slow
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_smollm2_logits_match_transformers(smollm2, padding_side):
    cfg, params, _, model, tokenizer = smollm2
    tokenizer.padding_side = padding_side
    enc = tokenizer(PROMPTS, return_tensors="np", padding=True)
    tokens, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    lengths = mask.sum(1)
    assert lengths.min() >= 64, lengths
    assert len(set(lengths)) > 1, "prompts of equal length would not exercise padding"
    ref = hf_logits(model, tokens, mask)
    got = ours(cfg, params, tokens, mask)
    real = mask > 0
    diff = max_diff_at(got, ref, mask)
    assert diff <= SMOL_TOL, f"SmolLM2 ({padding_side} padding): max diff {diff:.3g} > {SMOL_TOL}"
    same = got.argmax(-1) == ref.argmax(-1)
    assert same[real].all(), (f"argmax differs at {int((~same & real).sum())} real positions "
                              f"({padding_side} padding)")
