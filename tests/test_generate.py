"""KV-cache sampler: cached decode == uncached forward, greedy == transformers, per-row EOS,
sampling statistics, and greedy parity with transformers on the real SmolLM2."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from conftest import make_tiny_hf
from jaxalign import generate as gen
from jaxalign.convert import hf
from jaxalign.models import functional

N_NEW = 12
PAD = 0
EOS = 2                               # the tiny config's eos_token_id
PROMPT_LENS = (6, 3, 11, 16)          # 16 = a row without padding
P = gen.bucket_length(max(PROMPT_LENS))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gen")
    return path, make_tiny_hf(path)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    path, model = tiny_dir
    # Scanned layers compile ~2x faster here; the unrolled path is covered once below.
    cfg, params, _ = hf.load(path, scan_layers=True)
    return model, cfg, params


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    ids = [[1] + rng.integers(3, 96, n - 1).tolist() for n in PROMPT_LENS]
    tokens_BP, mask_BP = gen.left_pad(ids, PAD, P)
    return ids, tokens_BP, mask_BP


def _run(cfg, params, tokens_BP, mask_BP, seed=0, **settings):
    settings = {"max_new_tokens": N_NEW, "eos_ids": (EOS,), "pad_id": PAD, **settings}
    fn = gen.make_generate_fn(cfg, **settings)
    return jax.device_get(fn(params, tokens_BP, mask_BP, jax.random.key(seed)))


def _hf_generate(model, tokens_BP, mask_BP, max_new_tokens, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor(tokens_BP, dtype=torch.long),
                             attention_mask=torch.tensor(mask_BP, dtype=torch.long),
                             do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=PAD, **kw)
    new = out[:, tokens_BP.shape[1]:].numpy()
    # transformers stops when every row is done; ours always returns N columns of pad.
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=PAD)


@pytest.fixture(scope="module")
def greedy(tiny, prompts):
    _, cfg, params = tiny
    return _run(cfg, params, prompts[1], prompts[2])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decode_matches_full_forward(tiny, prompts, greedy, scan_layers):
    _, cfg, params = tiny
    _, tokens_BP, mask_BP = prompts
    cfg = cfg.replace(scan_layers=scan_layers)   # same params either way
    if not scan_layers:
        greedy = _run(cfg, params, tokens_BP, mask_BP)
    new_BN, out_mask_BN = greedy["tokens_BN"], greedy["mask_BN"].astype(bool)
    assert out_mask_BN.sum() >= 3 * N_NEW, "degenerate fixture: rows stopped almost at once"
    full_BT = np.concatenate([tokens_BP, new_BN], axis=1)
    seg_BT = np.concatenate([mask_BP, np.ones_like(new_BN)], axis=1)
    logits_BTV, _, _ = functional.apply(cfg, params, jnp.asarray(full_BT), segment_ids_BT=jnp.asarray(seg_BT))
    # Position P-1+i predicts new token i.
    logits_BNV = np.asarray(logits_BTV)[:, P - 1:-1]
    np.testing.assert_array_equal(np.where(out_mask_BN, logits_BNV.argmax(-1), PAD), new_BN)
    logp_BNV = np.asarray(jax.nn.log_softmax(logits_BNV, axis=-1))
    expected_BN = np.take_along_axis(logp_BNV, new_BN[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.where(out_mask_BN, expected_BN, 0.0), greedy["logprobs_BN"],
                               atol=1e-5, rtol=0)


def test_greedy_matches_transformers(tiny, prompts, greedy):
    model, _, _ = tiny
    expected_BN = _hf_generate(model, prompts[1], prompts[2], N_NEW, eos_token_id=EOS)
    np.testing.assert_array_equal(greedy["tokens_BN"], expected_BN)


def test_per_row_eos(tiny, prompts, greedy):
    model, cfg, params = tiny
    ref_BN = greedy["tokens_BN"]   # valid up to each row's first EOS (2), pad after
    # Make row 0 stop at step k >= 3: its greedy token there (new in the row) becomes a
    # second EOS id. Any row then stops at its first hit of either id, never later than in
    # `greedy`.
    k = next(i for i in range(3, N_NEW) if ref_BN[0, i] not in ref_BN[0, :i] and ref_BN[0, i] != PAD)
    eos = int(ref_BN[0, k])
    eos_ids = (eos, EOS)
    out = _run(cfg, params, prompts[1], prompts[2], eos_ids=eos_ids)
    for b in range(len(PROMPT_LENS)):
        hits = np.flatnonzero(np.isin(ref_BN[b], eos_ids))
        n = hits[0] + 1 if hits.size else N_NEW   # up to and including the first EOS
        assert out["lengths_B"][b] == n
        np.testing.assert_array_equal(out["mask_BN"][b], np.arange(N_NEW) < n)
        np.testing.assert_array_equal(out["tokens_BN"][b, :n], ref_BN[b, :n])
        assert (out["tokens_BN"][b, n:] == PAD).all() and (out["logprobs_BN"][b, n:] == 0).all()
        # Finishing other rows must not change a row's own log-probs.
        np.testing.assert_allclose(out["logprobs_BN"][b, :n], greedy["logprobs_BN"][b, :n], atol=1e-6)
    assert out["lengths_B"][0] == k + 1
    # transformers agrees, including pad after each row's EOS (list-valued eos_token_id).
    np.testing.assert_array_equal(out["tokens_BN"],
                                  _hf_generate(model, prompts[1], prompts[2], N_NEW, eos_token_id=list(eos_ids)))


def test_min_new_tokens_bans_eos_as_transformers(tiny, prompts, greedy):
    """min_new_tokens: no row ends before it, and the tokens are transformers' greedy ones with
    its `min_new_tokens` (row 0, whose first greedy token is made an EOS id, stops at once
    without it)."""
    model, cfg, params = tiny
    ref_BN = greedy["tokens_BN"]
    eos_ids = (int(ref_BN[0, 0]), EOS)   # row 0's greedy first token: it would stop at once
    m = 4
    out = _run(cfg, params, prompts[1], prompts[2], eos_ids=eos_ids, min_new_tokens=m)
    assert (out["lengths_B"] >= m).all()
    assert not np.isin(out["tokens_BN"][:, :m], eos_ids).any()
    np.testing.assert_array_equal(
        out["tokens_BN"], _hf_generate(model, prompts[1], prompts[2], N_NEW, min_new_tokens=m,
                                       eos_token_id=list(eos_ids)))
    free = _run(cfg, params, prompts[1], prompts[2], eos_ids=eos_ids)
    assert free["lengths_B"][0] == 1


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_sampling_seeds_and_degenerate_filters(tiny, prompts, greedy):
    _, cfg, params = tiny
    args = (cfg, params, prompts[1], prompts[2])
    a = _run(*args, seed=1, temperature=1.0)
    b = _run(*args, seed=1, temperature=1.0)
    c = _run(*args, seed=2, temperature=1.0)
    np.testing.assert_array_equal(a["tokens_BN"], b["tokens_BN"])
    assert (a["tokens_BN"] != c["tokens_BN"]).any()
    assert (a["tokens_BN"] != greedy["tokens_BN"]).any()
    # Only the arg-max survives top_k=1 or a tiny nucleus, whatever the temperature.
    for filt in ({"top_k": 1}, {"top_p": 1e-4}):
        out = _run(*args, seed=3, temperature=0.7, **filt)
        np.testing.assert_array_equal(out["tokens_BN"], greedy["tokens_BN"], err_msg=str(filt))


# Each setting is a compile; the filters alone are checked exactly in the next test.
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (20, 0.8)])
def test_first_token_frequencies(tiny, prompts, top_k, top_p):
    """2048 copies of one prompt, one new token each: frequencies match transformers' warpers."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    _, cfg, params = tiny
    temperature, n = 2.0, 2048
    tokens_1P, mask_1P = prompts[1][:1], prompts[2][:1]
    out = _run(cfg, params, np.repeat(tokens_1P, n, 0), np.repeat(mask_1P, n, 0), seed=7,
               max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
    logits_1V = torch.from_numpy(np.array(functional.apply(
        cfg, params, jnp.asarray(tokens_1P), segment_ids_BT=jnp.asarray(mask_1P))[0][:, -1]))
    scaled_1V = TemperatureLogitsWarper(temperature)(None, logits_1V)
    filtered_1V = scaled_1V
    if top_k:
        filtered_1V = TopKLogitsWarper(top_k)(None, filtered_1V)
    if top_p < 1.0:
        filtered_1V = TopPLogitsWarper(top_p)(None, filtered_1V)
    p_V = torch.softmax(filtered_1V, -1)[0].double().numpy()
    freq_V = np.bincount(out["tokens_BN"][:, 0], minlength=cfg.vocab_size) / n
    print(f"{top_k=} {top_p=}: {(p_V > 0).sum()} tokens kept")
    assert (freq_V[p_V == 0] == 0).all(), "sampled a token that the filters remove"
    sigma_V = np.sqrt(p_V * (1 - p_V) / n)
    assert np.all(np.abs(freq_V - p_V) <= 5 * sigma_V + 2 / n), np.abs(freq_V - p_V).max()
    # Log-probs are under the temperature-scaled, *unfiltered* distribution.
    logp_V = torch.log_softmax(scaled_1V, -1)[0].numpy()
    np.testing.assert_allclose(out["logprobs_BN"][:, 0], logp_V[out["tokens_BN"][:, 0]], atol=1e-5)


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    logits_BV = np.random.default_rng(0).normal(0, 3, (64, 50)).astype(np.float32)
    for top_k, top_p in [(5, 1.0), (0, 0.3), (0, 0.9), (10, 0.5), (50, 0.99)]:
        ref = torch.from_numpy(logits_BV)
        ref = TopKLogitsWarper(top_k)(None, ref) if top_k else ref
        ref = TopPLogitsWarper(top_p)(None, ref) if top_p < 1 else ref
        ours = np.asarray(gen._filter_top_k_top_p(jnp.asarray(logits_BV), top_k, top_p))
        np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()), err_msg=f"{top_k=} {top_p=}")


def test_sharded_matches_unsharded(tiny_dir, prompts, greedy):
    """On a (data 2, fsdp 2, tensor 2) mesh of fake devices: same tokens, log-probs to 1e-5."""
    from jaxalign.config import MeshConfig
    from jaxalign.sharding import batch_sharding, make_mesh
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg, params, _ = hf.load(tiny_dir[0], mesh=mesh, scan_layers=True)
    with jax.set_mesh(mesh):
        tokens_BP, mask_BP = (jax.device_put(x, batch_sharding(mesh)) for x in prompts[1:])
        out = _run(cfg, params, tokens_BP, mask_BP)
    np.testing.assert_array_equal(out["tokens_BN"], greedy["tokens_BN"])
    np.testing.assert_allclose(out["logprobs_BN"], greedy["logprobs_BN"], atol=1e-5, rtol=0)


def test_one_compile_per_bucket(tiny):
    _, cfg, params = tiny
    kw = dict(max_new_tokens=3, eos_ids=(EOS,), pad_id=PAD)
    a = gen.generate_ids(cfg, params, [[1, 5, 6], [1, 7]], **kw)
    b = gen.generate_ids(cfg, params, [[1] + list(range(3, 15)), [1, 9, 9, 9]], **kw)
    assert len(a) == len(b) == 2 and all(1 <= len(r) <= 3 for r in a + b)
    assert gen.make_generate_fn(cfg, 3, 0.0, 0, 1.0, (EOS,), PAD)._cache_size() == 1
    assert [gen.bucket_length(n) for n in (1, 16, 17, 200, 257)] == [16, 16, 32, 256, 512]
    with pytest.raises(ValueError, match="top_p"):
        gen.make_generate_fn(cfg, 3, 1.0, 0, 0.0)


@pytest.mark.slow  # loads the real SmolLM2
def test_smollm2_chat_greedy_matches_transformers(smollm2_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prompts = ["What is the capital of France?", "Give me a short list of three colors.",
               "Write one sentence about the sea."]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    eos = gen.eos_ids_for(tokenizer)
    assert eos == (2,)
    # Scanned layers: here they compiled ~3x faster and decoded ~2x faster than unrolled.
    cfg, params, _ = hf.load(smollm2_dir, scan_layers=True)
    # Record the token ids behind generate_text's strings (one batched call, one compile).
    calls = []
    real_generate_ids = gen.generate_ids

    def spy(cfg, params, prompt_ids, **kw):
        calls.append((prompt_ids, kw, real_generate_ids(cfg, params, prompt_ids, **kw)))
        return calls[-1][2]

    monkeypatch.setattr(gen, "generate_ids", spy)
    texts = gen.generate_text(cfg, params, tokenizer, prompts, chat=True, max_new_tokens=32)
    (prompt_ids, kw, ours), = calls
    assert kw["eos_ids"] == eos and kw["pad_id"] == tokenizer.pad_token_id
    for p, ids in zip(prompts, prompt_ids):   # the template's own tokenization, BOS not doubled
        assert ids == list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                         add_generation_prompt=True, tokenize=True)["input_ids"])
    assert texts == [tokenizer.decode(r, skip_special_tokens=True) for r in ours]
    assert texts[0] == "The capital of France is Paris."

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    for ids, got in zip(prompt_ids, ours):   # unpadded, one prompt at a time
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=32)[0, len(ids):].tolist()
        assert got == ref, tokenizer.decode(ref)


@pytest.mark.slow  # loads the real SmolLM2
def test_cli_generate_prints_transformers_greedy_completion(smollm2_dir, capsys):
    """`jaxalign generate MODEL --chat --prompt ...` prints exactly transformers' greedy
    completion (32 new tokens) and nothing else on stdout; usage errors exit 2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from jaxalign import cli

    prompt = "Give me a short list of three colors."
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=32, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    capsys.readouterr()
    assert cli.main(["generate", str(smollm2_dir), "--chat", "--prompt", prompt,
                     "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", str(smollm2_dir), "--max-new-tokens", "3"])  # no --prompt
    assert e.value.code == 2


def test_bf16_decoding_matches_the_bf16_forward(tiny, prompts, greedy):
    """Decoding in bf16 (fp32 params, cast once per call) reports the log-probs that the bf16
    training forward gives its tokens, up to bf16 round-off of two different programs, and
    differs from fp32 (so bf16 really ran)."""
    _, cfg, params = tiny
    _, tokens_BP, mask_BP = prompts
    cfg16 = cfg.replace(dtype="bfloat16")
    out = _run(cfg16, params, tokens_BP, mask_BP)
    np.testing.assert_array_equal(out["tokens_BN"][:, 0], greedy["tokens_BN"][:, 0])
    new_BN, out_mask_BN = out["tokens_BN"], out["mask_BN"].astype(bool)
    full_BT = np.concatenate([tokens_BP, new_BN], axis=1)
    seg_BT = np.concatenate([mask_BP, np.ones_like(new_BN)], axis=1)

    def gap(c):
        logits_BTV = np.asarray(functional.apply(c, params, jnp.asarray(full_BT),
                                                 segment_ids_BT=jnp.asarray(seg_BT))[0])[:, P - 1:-1]
        logp_BN = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits_BTV, axis=-1)),
                                     new_BN[..., None], axis=-1)[..., 0]
        return np.abs(np.where(out_mask_BN, logp_BN, 0.0) - out["logprobs_BN"]).max()

    # 0.016 seen; this fixture's fp32 vs bf16 forwards differ by up to ~0.5.
    assert gap(cfg16) < 0.05
    assert gap(cfg) > 0.01


def _generate(cfg, params, tokens_BP, mask_BP, **settings):
    """`gen.generate` jitted with settings `make_generate_fn` does not expose (cache_chunk)."""
    settings = {"max_new_tokens": N_NEW, "eos_ids": (EOS,), "pad_id": PAD, **settings}
    fn = jax.jit(lambda p, t, m, k: gen.generate(cfg, p, t, m, k, **settings))
    return jax.device_get(fn(params, tokens_BP, mask_BP, jax.random.key(0)))


def test_decode_loops_cover_every_step():
    assert gen.decode_loops(15, 12) == ((12, 27),)                 # one loop: the full cache
    assert gen.decode_loops(31, 128) == ((64, 95), (128, 159))
    assert gen.decode_loops(0, 1000) == ((250, 250), (500, 500), (750, 750), (1000, 1000))
    assert gen.decode_loops(5, 10, chunk=4) == ((4, 9), (7, 12), (10, 15))


def test_filled_part_attention_equals_full_attention(tiny, prompts, greedy):
    """Decode loops whose attention reads only the filled cache slots (chunks of 3 steps:
    4 loops, the cache grown between them) give the tokens of one loop over the full cache
    (`greedy`, N_NEW < the default chunk), with the same log-probs up to round-off."""
    _, cfg, params = tiny
    assert len(gen.decode_loops(P - 1, N_NEW, chunk=3)) == 4
    out = _generate(cfg, params, prompts[1], prompts[2], cache_chunk=3)
    np.testing.assert_array_equal(out["tokens_BN"], greedy["tokens_BN"])
    np.testing.assert_array_equal(out["mask_BN"], greedy["mask_BN"])
    # Round-off only (1.4e-6 seen): the attention's reductions run over fewer masked slots.
    np.testing.assert_allclose(out["logprobs_BN"], greedy["logprobs_BN"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_lora(tiny):
    """The tiny model with a trained-like adapter on every target (random b, not zero)."""
    from jaxalign.config import LORA_TARGETS
    from jaxalign.models import lora
    _, base_cfg, base = tiny
    cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=LORA_TARGETS)
    adapters, frozen = lora.split(lora.add_adapters(cfg, base, seed=1))
    keys = iter(jax.random.split(jax.random.key(3), 64))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x, adapters)
    return cfg, lora.combine(adapters, frozen)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_lora_merged_decode_equals_adapter_decode(tiny, tiny_lora, prompts, greedy):
    """The sampler folds LoRA into the decode weights once per call (the RL rollout passes
    the live adapter params): same tokens as decoding with the adapter products on every
    step (params given in per-layer layout, which `decode_params` leaves as they are), and
    log-probs equal up to fp32 round-off; both are the adapted model's own greedy tokens
    (the uncached forward with adapters agrees), which differ from the base model's."""
    cfg, params = tiny_lora
    _, tokens_BP, mask_BP = prompts
    merged_cfg, merged = gen.decode_params(cfg, params)
    assert merged_cfg.lora_rank == 0 and "q_lora" not in merged["layers"]["attn"]
    out = _run(cfg, params, tokens_BP, mask_BP)
    adapter = _run(cfg, functional.unstack_layers(cfg, params), tokens_BP, mask_BP)
    assert gen.decode_params(cfg, functional.unstack_layers(cfg, params))[0].lora_rank == 4
    np.testing.assert_array_equal(out["tokens_BN"], adapter["tokens_BN"])
    np.testing.assert_allclose(out["logprobs_BN"], adapter["logprobs_BN"], atol=2e-5, rtol=0)
    assert (out["tokens_BN"] != greedy["tokens_BN"]).any(), "the adapter changed nothing"
    new_BN, out_mask_BN = out["tokens_BN"], out["mask_BN"].astype(bool)
    full_BT = np.concatenate([tokens_BP, new_BN], axis=1)
    seg_BT = np.concatenate([mask_BP, np.ones_like(new_BN)], axis=1)
    logits_BNV = np.asarray(functional.apply(cfg, params, jnp.asarray(full_BT),
                                             segment_ids_BT=jnp.asarray(seg_BT))[0])[:, P - 1:-1]
    np.testing.assert_array_equal(np.where(out_mask_BN, logits_BNV.argmax(-1), PAD), new_BN)
