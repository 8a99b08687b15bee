"""Every model family against transformers' own classes (tiny random configs, fp32): logits
with left and right padding, greedy decoding token for token, the bitwise HF round trip, a
transformers-readable export (causal LM and sequence classifier), fields we refuse by name,
and a few steps of SFT, DPO and GRPO through the ordinary recipes.

Windows (Mistral, Phi-3, Gemma's sliding layers) are shorter than the prompts, so the
sliding-window mask is live in the training forward, the prefill and the decode.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from conftest import HF_FAMILY_CLASSES, make_tiny_family_hf
from jaxalign import checkpoint, families
from jaxalign import generate as gen
from jaxalign.config import ConfigError, LoRAConfig, ModelConfig, from_dict
from jaxalign.convert import hf, peft
from jaxalign.models import functional, heads

FP32_TOL = 1e-4   # the model-fidelity contract
GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
               "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
B, T = 3, 24

VARIANTS = {
    # GQA, untied, window 6 < every sequence below.
    "mistral_gqa_window": ("mistral", dict(sliding_window=6)),
    "mistral_mqa_tied": ("mistral", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2_gqa_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2_mqa": ("qwen2", dict(num_key_value_heads=1)),
    # head_dim 24 != hidden / heads (16), as in Qwen3.
    "qwen3_gqa_headdim_tied": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
    "qwen3_mqa": ("qwen3", dict(num_key_value_heads=1)),
    "phi3_gqa_window": ("phi3", dict(sliding_window=7)),
    "phi3_mqa_tied": ("phi3", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # Gemma: windows on the layers transformers' layer_types marks sliding only (Gemma 2
    # alternates: sliding, full, sliding), both soft-caps on (small ones in the MQA variant, so
    # that they bend the numbers), query_pre_attn_scalar != head_dim.
    "gemma2_gqa_window_tied": ("gemma2", dict(sliding_window=6, num_hidden_layers=3,
                                              query_pre_attn_scalar=24)),
    "gemma2_mqa_untied_caps": ("gemma2", dict(num_key_value_heads=1, tie_word_embeddings=False,
                                              sliding_window=5, attn_logit_softcapping=2.0,
                                              final_logit_softcapping=6.0)),
    # Gemma 3: q/k norms, local RoPE base 100 on the sliding layers, global 10^4 elsewhere.
    "gemma3_gqa_window_tied": ("gemma3", dict(
        sliding_window=6, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=24, rope_parameters=GEMMA3_ROPE)),
    "gemma3_mqa_untied_headdim": ("gemma3", dict(
        num_key_value_heads=1, tie_word_embeddings=False, head_dim=24, sliding_window=7,
        num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=GEMMA3_ROPE)),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    family, kw = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = make_tiny_family_hf(path, family, seed=len(request.param), **kw)
    cfg, params, hf_config = hf.load(path, scan_layers=True)
    return dict(name=request.param, family=family, path=path, model=model, cfg=cfg,
                params=params, hf_config=hf_config)


def padded_batch(seed=0):
    """Row 0 left-padded, row 1 right-padded, row 2 full; pad id 0."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    mask[0, :5] = 0
    mask[1, T - 7:] = 0
    return np.where(mask > 0, rng.integers(3, 96, (B, T)), 0).astype(np.int32), mask


def hf_logits(model, tokens, mask):
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(pos, dtype=torch.long)).logits.float().numpy()


def our_logits(cfg, params, tokens, mask):
    fn = jax.jit(lambda p, t, m: functional.apply(cfg, p, t, segment_ids_BT=m)[0])
    return np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(mask)))


def assert_close(ours, ref, mask, what):
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref)[mask > 0].max())
    assert err <= FP32_TOL * scale, f"{what}: max |ours - transformers| = {err:.3g} (scale {scale:.3g})"


def test_config_reads_the_family(tiny):
    cfg, family = tiny["cfg"], tiny["family"]
    assert cfg.family == family
    assert cfg.qkv_bias == (family == "qwen2") and cfg.qk_norm == (family in ("qwen3", "gemma3"))
    assert cfg.gemma_block == family.startswith("gemma")
    assert cfg.sliding_window == VARIANTS[tiny["name"]][1].get("sliding_window")
    assert tiny["hf_config"]["architectures"] == [HF_FAMILY_CLASSES[family][1]]


def test_fp32_logits_match_transformers(tiny):
    tokens, mask = padded_batch()
    ref = hf_logits(tiny["model"], tokens, mask)
    assert np.abs(ref).max() > 3.0, "degenerate fixture: logits too small for a 1e-4 test"
    assert_close(our_logits(tiny["cfg"], tiny["params"], tokens, mask), ref, mask, tiny["name"])
    # The unrolled layer form reads the same params.
    assert_close(our_logits(tiny["cfg"].replace(scan_layers=False), tiny["params"], tokens, mask),
                 ref, mask, tiny["name"] + " unrolled")


def test_sliding_window_is_live(tiny):
    """Without its window a windowed model gives other logits: the mask is really applied."""
    cfg = tiny["cfg"]
    if cfg.sliding_window is None:
        pytest.skip("no window in this variant")
    tokens, mask = padded_batch()
    ref = hf_logits(tiny["model"], tokens, mask)
    wide = our_logits(cfg.replace(sliding_window=None), tiny["params"], tokens, mask)
    assert np.abs(wide - ref)[mask > 0].max() > 1e-2


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_shared_prefix_rows_equal_separate_rows(tiny):
    """[prompt | a | b] in one row with branch ids (b's positions continuing from the prompt)
    gives each branch the logits of its own row [prompt | a], [prompt | b]: the mask hides a
    from b and the window counts positions, not slots (windows here are shorter than b)."""
    cfg, params = tiny["cfg"], tiny["params"]
    rng = np.random.default_rng(3)
    P, A, Bn = 7, 5, 9
    prompt, a, b = (rng.integers(3, cfg.vocab_size, n) for n in (P, A, Bn))
    shared = np.concatenate([prompt, a, b])[None]
    branch = np.array([0] * P + [1] * A + [2] * Bn)[None]
    pos = np.concatenate([np.arange(P + A), P + np.arange(Bn)])[None]
    logits, _, _ = functional.apply(cfg, params, jnp.asarray(shared), positions_BT=jnp.asarray(pos),
                                    branch_ids_BT=jnp.asarray(branch))
    for part, lo, hi in ((a, P, P + A), (b, P + A, P + A + Bn)):
        alone, _, _ = functional.apply(cfg, params, jnp.asarray(np.concatenate([prompt, part])[None]))
        np.testing.assert_allclose(np.asarray(logits[0, lo:hi]), np.asarray(alone[0, P:]),
                                   atol=2e-5, rtol=2e-5, err_msg=tiny["name"])
    np.testing.assert_allclose(np.asarray(logits[0, :P]), np.asarray(alone[0, :P]), atol=2e-5)


def test_gemma_per_layer_features_are_live(tiny):
    """Each Gemma feature the parity test covers changes the logits when switched off: the
    window on the sliding layers only (not all), the soft-caps, the local RoPE base."""
    cfg = tiny["cfg"]
    if not cfg.gemma_block:
        pytest.skip("not a Gemma variant")
    tokens, mask = padded_batch()
    ref = our_logits(cfg, tiny["params"], tokens, mask)
    off = {"layer_types": dict(layer_types=None)}
    if cfg.attn_logit_softcap is not None:
        off["attn_logit_softcap"] = dict(attn_logit_softcap=None)
        off["final_logit_softcap"] = dict(final_logit_softcap=None)
    if cfg.rope_local_theta is not None:
        off["rope_local_theta"] = dict(rope_local_theta=None)
    assert len(off) >= 2
    for what, change in off.items():
        other = our_logits(cfg.replace(**change), tiny["params"], tokens, mask)
        assert np.abs(other - ref)[mask > 0].max() > 1e-3, what


def test_head_paths_see_the_capped_logits(tiny):
    """Gemma 2's final soft-cap lives in the model's forward (`Llama.__call__`, generation) and
    in the chunked head paths (`losses.xent.head_logprobs`: SFT, DPO, likelihood eval;
    `rollout.response_stats`: RL scoring): all give transformers' log-probs."""
    import torch.nn.functional as F
    from jaxalign.losses.xent import head_logprobs
    from jaxalign.train.rl.rollout import response_stats
    cfg, params = tiny["cfg"], tiny["params"]
    if cfg.final_logit_softcap is None:
        pytest.skip("no final soft-cap in this variant")
    tokens, mask = padded_batch(seed=6)
    targets = np.roll(tokens, -1, axis=1)
    ref = F.log_softmax(torch.tensor(hf_logits(tiny["model"], tokens, mask)), -1).numpy()
    ref = np.take_along_axis(ref, targets[..., None], -1)[..., 0]
    _, hidden, _ = functional.apply(cfg, params, jnp.asarray(tokens),
                                    segment_ids_BT=jnp.asarray(mask), return_logits=False)
    head, head_is_VD = functional.lm_head(cfg, params)
    chunked, _ = head_logprobs(hidden, head, jnp.asarray(targets), head_is_VD=head_is_VD, chunk=8,
                               softcap=cfg.final_logit_softcap)
    rl, _ = response_stats(hidden, head, jnp.asarray(targets), head_is_VD=head_is_VD,
                           temperature=1.0, chunk=8, softcap=cfg.final_logit_softcap)
    uncapped, _ = head_logprobs(hidden, head, jnp.asarray(targets), head_is_VD=head_is_VD, chunk=8)
    for what, ours in (("head_logprobs", chunked), ("response_stats", rl)):
        assert_close(np.asarray(ours), ref, mask, what)
    assert np.abs(np.asarray(uncapped) - ref)[mask > 0].max() > 1e-2   # the cap is live


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_greedy_decoding_matches_transformers_generate(tiny):
    n_new, lens = 12, (6, 3, 11, 16)
    rng = np.random.default_rng(1)
    ids = [[1] + rng.integers(3, 96, n - 1).tolist() for n in lens]
    P = gen.bucket_length(max(lens))
    tokens_BP, mask_BP = gen.left_pad(ids, 0, P)
    fn = gen.make_generate_fn(tiny["cfg"], max_new_tokens=n_new, eos_ids=(2,), pad_id=0)
    out = jax.device_get(fn(tiny["params"], tokens_BP, mask_BP, jax.random.key(0)))
    with torch.no_grad():
        ref = tiny["model"].generate(torch.tensor(tokens_BP, dtype=torch.long),
                                     attention_mask=torch.tensor(mask_BP, dtype=torch.long),
                                     do_sample=False, max_new_tokens=n_new, pad_token_id=0,
                                     eos_token_id=2)
    ref = ref[:, P:].numpy()
    ref = np.pad(ref, ((0, 0), (0, n_new - ref.shape[1])), constant_values=0)
    assert out["mask_BN"].sum() >= 2 * n_new, "degenerate fixture: rows stopped at once"
    np.testing.assert_array_equal(out["tokens_BN"], ref)
    if tiny["cfg"].layer_types is not None:   # layer kinds picked in the per-layer decode loop too
        loop = jax.device_get(fn(functional.unstack_layers(tiny["cfg"], tiny["params"]), tokens_BP,
                                 mask_BP, jax.random.key(0)))
        np.testing.assert_array_equal(loop["tokens_BN"], ref)


def _tensors(path):
    from safetensors.numpy import load_file
    return load_file(str(path / "model.safetensors"))


def test_hf_round_trip_is_bitwise(tiny, tmp_path):
    out = hf.save(tmp_path / "out", tiny["cfg"], tiny["params"], hf_config=tiny["hf_config"])
    a, b = _tensors(tiny["path"]), _tensors(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert json.loads((out / "config.json").read_text()) == tiny["hf_config"]


def test_bf16_export_loads_in_transformers(tiny, tmp_path):
    """`dtype=bfloat16` export: the fp32 tensors rounded to bf16, config.json saying so."""
    import transformers
    out = hf.save(tmp_path / "bf16", tiny["cfg"], tiny["params"], hf_config=tiny["hf_config"],
                  dtype="bfloat16")
    a, b = _tensors(tiny["path"]), _tensors(out)
    for k in a:
        assert str(b[k].dtype) == "bfloat16" and np.array_equal(a[k].astype(b[k].dtype), b[k]), k
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and type(model).__name__ == HF_FAMILY_CLASSES[tiny["family"]][1]


def test_export_from_config_alone_loads_in_transformers(tiny, tmp_path):
    """config.json written from the ModelConfig alone (the family's own architectures,
    model_type and keys): transformers builds the same model from it."""
    import transformers
    cfg = tiny["cfg"]
    out = hf.save(tmp_path / "bare", cfg, tiny["params"])
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [HF_FAMILY_CLASSES[tiny["family"]][1]]
    assert written["model_type"] == families.get(tiny["family"]).model_types[0]
    assert ModelConfig.from_hf(written) == cfg
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(model).__name__ == HF_FAMILY_CLASSES[tiny["family"]][1]
    tokens, mask = padded_batch(seed=2)
    assert_close(hf_logits(model, tokens, mask), hf_logits(tiny["model"], tokens, mask), mask,
                 "re-read by transformers")


def test_sequence_classifier_export_scored_by_transformers(tiny, tmp_path):
    import transformers
    cfg, params, hf_config, _ = checkpoint.load_model(tiny["path"], num_labels=1, seed=4)
    params = dict(params, score=params["score"] * 10)   # scores of order 1: 1e-4 means something
    out = hf.save(tmp_path / "rm", cfg, params, hf_config=hf_config)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, dtype=torch.float32).eval()
    assert model.config.architectures == [HF_FAMILY_CLASSES[tiny["family"]][2]]
    assert type(model).__name__ == HF_FAMILY_CLASSES[tiny["family"]][2]
    tokens, mask = padded_batch(seed=3)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    assert np.abs(ref).max() > 0.5, ref
    ours = np.asarray(heads.score(cfg, params, jnp.asarray(tokens), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=FP32_TOL * max(1.0, np.abs(ref).max()), rtol=0)
    cfg2, params2, _ = hf.load(out)
    assert cfg2 == cfg.replace(scan_layers=cfg2.scan_layers)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_sharded_forward_equals_single_device(tiny):
    """Each family's params (biases, q/k norms, fused-row splits) land on shardings from the
    one rules table and give the single-device logits."""
    from conftest import SHARDED_TOL, sharded_forward
    from jaxalign import sharding
    from jaxalign.config import MeshConfig
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg, params, _ = hf.load(tiny["path"], mesh, scan_layers=True)
    want = functional.param_shardings(cfg, mesh)
    jax.tree.map(lambda x, sh: np.testing.assert_equal(x.sharding, sh), params, want)
    tokens, mask = padded_batch(seed=4)
    tokens, mask = np.concatenate([tokens, tokens[:1]]), np.concatenate([mask, mask[:1]])  # B=4
    ref = our_logits(cfg, tiny["params"], tokens, mask)
    with jax.set_mesh(mesh):
        out = sharded_forward(cfg, mesh, tokens.shape)(
            params, jax.device_put(tokens, sharding.batch_sharding(mesh, 2, tokens.shape)),
            jax.device_put(mask, sharding.batch_sharding(mesh, 2, mask.shape)))
    assert float(np.abs(np.asarray(out) - ref)[mask > 0].max()) <= SHARDED_TOL


# One variant per family (tied and untied heads among them): the plan's split follows the
# family's parameter tree, and each plan compiles an eight-device train step.
PLAN_VARIANTS = ["gemma2_mqa_untied_caps", "gemma3_mqa_untied_headdim", "mistral_gqa_window",
                 "phi3_mqa_tied", "qwen2_mqa", "qwen3_gqa_headdim_tied"]


@pytest.mark.slow  # trains / compiles a run per family
@pytest.mark.parametrize("tiny", PLAN_VARIANTS, indirect=True)
def test_plan_reads_every_family(tiny):
    """`jaxalign plan` from config.json alone: the family's params, split over fsdp=8."""
    import math
    from jaxalign.config import MeshConfig, OptimConfig, TrainConfig
    from jaxalign.config import ModelSource
    from jaxalign.data.config import DataConfig, DatasetSpec
    from jaxalign.train import plan
    from jaxalign.train.sft import SFTConfig
    cfg = plan.model_config(str(tiny["path"]))
    assert cfg.replace(scan_layers=True) == tiny["cfg"].replace(remat=cfg.remat)
    total = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(functional.abstract_params(cfg)))
    run = SFTConfig(out_dir="unused", model=ModelSource(path=str(tiny["path"]), scan_layers=True,
                                                        remat="full"),
                    train=TrainConfig(steps=10, batch_size=8), optim=OptimConfig(),
                    data=DataConfig(train=(DatasetSpec(path="unused.jsonl"),), seq_len=32))
    p = plan.plan_mesh("sft", run, MeshConfig(fsdp=8))
    assert total / 8 <= p.params_bytes < total / 8 * 1.2   # norms (and Qwen3's q/k norms) replicated
    assert p.optimizer_bytes == 2 * p.params_bytes + 8


# ----------------------------------------------------------------------------- refusals

BASE = {"vocab_size": 8, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2}


@pytest.mark.parametrize("config,fragments", [
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4},
     ["use_sliding_window", "qwen2"]),
    ({"model_type": "qwen3", "use_sliding_window": True}, ["use_sliding_window"]),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0],
                                             "long_factor": [1.0]}}, ["rope_scaling", "longrope"]),
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "su", "rope_theta": 1e4}},
     ["rope_scaling", "su"]),
    ({"model_type": "phi3", "partial_rotary_factor": 0.5}, ["partial_rotary_factor"]),
    ({"model_type": "mistral", "num_local_experts": 8}, ["num_local_experts", "mixture-of-experts"]),
    ({"model_type": "qwen2", "num_experts": 4}, ["num_experts"]),
    ({"model_type": "falcon"}, ["'falcon'", "model_type"]),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True},
     ["use_bidirectional_attention", "gemma3"]),
    ({"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     ["rope_parameters.sliding_attention"]),
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, ["hidden_act", "'gelu'"]),
    ({"model_type": "qwen2", "architectures": ["LlamaForCausalLM"]}, ["'qwen2'", "architectures"]),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForTokenClassification"]},
     ["Qwen2ForTokenClassification"]),
], ids=["qwen2_window", "qwen3_window", "phi3_longrope", "phi3_su", "phi3_partial_rope",
        "moe_local_experts", "moe_experts", "falcon", "gemma3_bidirectional", "gemma3_local_rope",
        "gemma2_gelu", "mismatched_arch", "token_classifier"])
def test_unimplemented_fields_are_refused_by_name(config, fragments):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf({**BASE, **config})
    assert "\n" not in str(err.value)
    for frag in fragments:
        assert frag in str(err.value), f"error does not name {frag!r}: {err.value}"


def test_every_family_declares_its_transformers_classes():
    import transformers
    for name, family in families.FAMILIES.items():
        for arch in (family.causal_lm[0], family.classifier):
            assert hasattr(transformers, arch), (name, arch)
    assert sorted(families.FAMILIES) == sorted(HF_FAMILY_CLASSES)


def test_phi3_lora_targets_name_its_fused_modules():
    cfg = ModelConfig.from_hf({**BASE, "model_type": "phi3"})
    lcfg = LoRAConfig(rank=4, targets=("qkv_proj", "gate_up_proj", "o_proj")).apply_to(cfg)
    assert lcfg.lora_targets == ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj")
    params = functional.init_params(lcfg)
    assert "q_lora" in params["layers"]["attn"] and "up_lora" in params["layers"]["mlp"]


@pytest.mark.slow  # over 3 s: outside the fast tier
@pytest.mark.parametrize("targets", [("qkv_proj", "gate_up_proj", "o_proj", "down_proj"),
                                     ("q_proj", "v_proj", "up_proj")], ids=["all", "some_parts"])
def test_peft_adapter_of_fused_phi3_loads_in_peft_with_our_logits(tmp_path, targets):
    """Our separate q / k / v (gate / up) adapters as one PEFT adapter on the fused HF module:
    A stacked, B block-diagonal, rank and alpha scaled per module; PEFT's model = ours."""
    peft_lib = pytest.importorskip("peft")
    import transformers
    src = tmp_path / "phi3"
    make_tiny_family_hf(src, "phi3", sliding_window=7)
    cfg, params, _ = hf.load(src)
    cfg = LoRAConfig(rank=2, alpha=8, targets=targets).apply_to(cfg)
    fresh = functional.init_params(cfg, seed=1)
    key = iter(jax.random.split(jax.random.key(2), 64))

    def adapters(tree, base):   # base weights from the checkpoint, adapters random (b != 0)
        return {k: (adapters(v, base.get(k, {})) if isinstance(v, dict) and not k.endswith("_lora")
                    else {"a": v["a"], "b": 0.5 * jax.random.normal(next(key), v["b"].shape)}
                    if k.endswith("_lora") else base[k]) for k, v in tree.items()}

    params = adapters(fresh, params)
    peft.save_peft(tmp_path / "adapter", cfg, params, base_model_path=str(src))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    fused = {"qkv_proj", "gate_up_proj"} & set(config["target_modules"])
    assert fused and not {"q_proj", "k_proj", "v_proj", "up_proj"} & set(config["target_modules"])
    base = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = peft_lib.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens, mask = padded_batch(seed=5)
    ours = our_logits(cfg, params, tokens, mask)
    ref = hf_logits(model, tokens, mask)
    assert np.abs(ours - our_logits(cfg.without_lora(), hf.load(src)[1], tokens, mask)).max() > 0.1
    assert_close(ours, ref, mask, f"phi3 PEFT {targets}")


# ----------------------------------------------------------------------------- hub ids

def test_hub_id_config_is_checked_before_weights(tmp_path, monkeypatch):
    """A cache laid out on disk (offline). What `hub.resolve` asks huggingface_hub for is
    recorded around the real call: an unsupported architecture gets config.json only and is
    refused; a supported sharded one gets its config, side files and index, then exactly
    the shard files the index names (a stray *.safetensors beside them is not asked for)."""
    from hub_cache import lay_out
    from huggingface_hub.utils import filter_repo_objects
    from jaxalign.convert import hub

    src = tmp_path / "qwen"
    make_tiny_family_hf(src, "qwen2")
    cfg, params, hf_config = hf.load(src)
    sharded = hf.save(tmp_path / "sharded", cfg, params, hf_config=hf_config, max_shard_bytes=40_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shutil.copyfile(sharded / shards[0], sharded / "consolidated.safetensors")
    gemma = tmp_path / "falcon"
    shutil.copytree(src, gemma)
    (gemma / "config.json").write_text(json.dumps({**hf_config, "model_type": "falcon",
                                                   "architectures": ["FalconForCausalLM"]}))
    cache = tmp_path / "cache"
    lay_out(sharded, cache, "org/qwen", copy=True)
    lay_out(gemma, cache, "org/falcon", copy=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear_cache()
    asked = []
    real = hub._download

    def recording(repo_id, revision, cache_, local_only, patterns, where):
        asked.append((repo_id, tuple(patterns)))
        return real(repo_id, revision, cache_, local_only, patterns, where)

    monkeypatch.setattr(hub, "_download", recording)
    with pytest.raises(hub.HubError) as err:
        hub.resolve("hf://org/falcon")
    assert "'falcon'" in str(err.value) and "no weights were downloaded" in str(err.value)
    assert asked == [("org/falcon", ("config.json",))]

    asked.clear()
    hub.clear_cache()
    snap = hub.resolve("hf://org/qwen")
    assert [a[0] for a in asked] == ["org/qwen"] * 3
    assert asked[0][1] == ("config.json",)
    assert not [p for p in asked[1][1] if p.endswith(".safetensors")]
    files = [p.name for p in snap.iterdir()]
    assert sorted(filter_repo_objects(files, allow_patterns=list(asked[2][1]))) == shards


# ----------------------------------------------------------------------------- training

TRAIN_FAMILIES = {   # windows shorter than the rows, so training runs through the window mask
    "mistral": dict(sliding_window=8), "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24), "phi3": dict(sliding_window=8, num_key_value_heads=1),
    "gemma2": dict(sliding_window=8, num_key_value_heads=1),
    "gemma3": dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
}
LORA_TARGETS = {"mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
                "qwen3": ["q_proj", "v_proj", "gate_proj"], "phi3": ["qkv_proj", "gate_up_proj"],
                "gemma2": ["q_proj", "v_proj", "gate_proj", "down_proj"], "gemma3": ["q_proj", "k_proj", "up_proj"]}


@pytest.fixture(scope="module", params=sorted(TRAIN_FAMILIES))
def trainable(request, tmp_path_factory):
    """A tiny transformers-built model of the family with the tiny ChatML tokenizer."""
    from make_tiny_model import make_tiny_tokenizer
    from jaxalign.synth import prefs as synth
    from conftest import write_tasks

    family = request.param
    root = tmp_path_factory.mktemp(f"train_{family}")
    tok = make_tiny_tokenizer(root / "model")
    make_tiny_family_hf(root / "model", family, seed=5, init_std=0.02, vocab_size=384,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, max_position_embeddings=256,
                        **TRAIN_FAMILIES[family])   # rows of 192 tokens (RM, DPO)
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(48):
            a, b = i % 8 + 2, i // 8 + 3
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                                "answer": str(a + b)}) + "\n")
    train, _ = synth.write_splits(root / "prefs", 64, 8, 0, kinds=("format", "concise"))
    return dict(family=family, root=root, model_dir=root / "model",
                tasks=write_tasks(root / "tasks.jsonl"), prefs=train, prompts=prompts)


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _common(t, out, steps):
    return {"out_dir": str(out), "model": {"path": str(t["model_dir"]), "scan_layers": False},
            "train": {"steps": steps, "batch_size": 8, "log_every": 1, "save_every": 0,
                      "progress": False, "tensorboard": False},
            "optim": {"lr": 3e-3, "schedule": "constant"},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}


@pytest.mark.slow  # trains / compiles a run per family
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_lowers_the_loss(trainable, lora):
    from jaxalign.train.sft import SFTConfig, run_sft
    out = trainable["root"] / f"sft_{lora}"
    raw = {**_common(trainable, out, 8),
           "data": {"train": [{"path": str(trainable["tasks"])}], "seq_len": 64, "seed": 1}}
    if lora:
        raw["lora"] = {"rank": 4, "alpha": 16, "targets": LORA_TARGETS[trainable["family"]]}
        raw["optim"]["lr"] = 1e-2
    run_sft(from_dict(SFTConfig, raw), devices=jax.devices()[:1])
    rows = _rows(out)
    assert np.mean([r["loss"] for r in rows[-2:]]) < np.mean([r["loss"] for r in rows[:2]]) - 0.3, \
        [round(r["loss"], 3) for r in rows]
    # The run exports as the family's own HF model (LoRA merged), which transformers reads.
    from jaxalign import cli
    assert cli.main(["export", str(out), str(out / "hf_out")]) == 0
    written = json.loads((out / "hf_out" / "config.json").read_text())
    assert written["architectures"] == [HF_FAMILY_CLASSES[trainable["family"]][1]]
    if not lora:   # and `jaxalign generate` runs the exported family model
        assert cli.main(["generate", str(out / "hf_out"), "--chat", "--prompt", "What is 2 plus 3?",
                         "--max-new-tokens", "4"]) == 0


# The preference recipes on the families whose trunk differs most from Llama's (biases; the
# fused projections; soft-capped logits with alternating windows); every family's forward is
# checked against transformers above and trains under SFT and GRPO.
PREFERENCE_FAMILIES = ["qwen2", "phi3", "gemma2"]


@pytest.mark.slow  # trains / compiles a run per family
@pytest.mark.parametrize("trainable", PREFERENCE_FAMILIES, indirect=True)
def test_reward_model_lowers_the_loss(trainable):
    """`jaxalign rm` on a causal LM of the family: a score head, Bradley-Terry loss down."""
    import math
    from jaxalign.train.rm import RMConfig, run_rm
    out = trainable["root"] / "rm"
    raw = {**_common(trainable, out, 8),
           "data": {"train": [{"path": str(trainable["prefs"])}], "seq_len": 192, "pack": False}}
    run_rm(from_dict(RMConfig, raw), devices=jax.devices()[:1])
    rows = _rows(out)
    assert np.mean([r["loss"] for r in rows[-2:]]) < math.log(2) - 0.05, [r["loss"] for r in rows]


@pytest.mark.slow  # trains / compiles a run per family
@pytest.mark.parametrize("trainable", PREFERENCE_FAMILIES, indirect=True)
def test_dpo_lowers_the_loss(trainable):
    import math
    from jaxalign.train.dpo import DPOConfig, run_dpo
    out = trainable["root"] / "dpo"
    raw = {**_common(trainable, out, 8),
           "data": {"train": [{"path": str(trainable["prefs"])}], "seq_len": 192, "pack": False}}
    run_dpo(from_dict(DPOConfig, raw), devices=jax.devices()[:1])
    rows = _rows(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert np.mean([r["loss"] for r in rows[-2:]]) < math.log(2) - 0.05, [r["loss"] for r in rows]


@pytest.mark.slow  # trains / compiles a run per family
def test_grpo_raises_the_reward(trainable):
    from jaxalign.train.rl.config import RLConfig
    from jaxalign.train.rl.driver import run_rl
    out = trainable["root"] / "grpo"
    raw = {"out_dir": str(out), "algorithm": "grpo",
           "model": {"path": str(trainable["model_dir"]), "scan_layers": False},
           "data": {"prompts": str(trainable["prompts"]), "chat": True, "max_prompt_len": 64},
           "rollout": {"batch_size": 4, "num_generations": 4, "max_new_tokens": 8,
                       "temperature": 1.0},
           "reward": {"functions": ["jaxalign.rewards:digits"]},
           "ppo": {"epochs": 2, "minibatches": 2}, "grpo": {"beta": 0.04},
           "train": {"iterations": 16, "save_every": 0, "sample_every": 0,
                     "tensorboard": False, "progress": False},
           "optim": {"lr": 5e-3, "schedule": "constant"},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    run_rl(from_dict(RLConfig, raw), devices=jax.devices()[:1])
    rows = _rows(out)
    first = np.mean([r["reward_mean"] for r in rows[:4]])
    last = np.mean([r["reward_mean"] for r in rows[-4:]])
    assert last > first + 0.1, [round(r["reward_mean"], 3) for r in rows]


# ----------------------------------------------------------------------------- released shapes

@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen3-0.6b", "mistral-7b-v0.3", "phi-3-mini-4k",
                                  "gemma-2-2b", "gemma-3-1b"])
def test_released_configs_give_transformers_tensor_shapes(name):
    """The config.json of a released checkpoint (configs/arch/): every tensor our rows expect
    has the shape transformers' own model of that config has (built on the meta device, no
    weights), no tensor missing or extra, and the parameter count is the published one."""
    import math
    import transformers
    from pathlib import Path
    from jaxalign.train import plan
    path = Path(__file__).resolve().parents[1] / "configs" / "arch" / name
    cfg = plan.model_config(str(path))
    hf_cfg = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    if cfg.gemma_block:   # which layers are windowed, and Gemma 3's two RoPE bases, as transformers reads them
        assert cfg.layer_types == tuple(hf_cfg.layer_types)
        rope = hf_cfg.rope_parameters
        if "full_attention" in rope:
            assert (cfg.rope_theta, cfg.rope_local_theta) == (
                rope["full_attention"]["rope_theta"], rope["sliding_attention"]["rope_theta"])
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    ours = {key: hf.expected_hf_shape(row, cfg) for row in hf.active_rows(cfg)
            for key in hf.hf_keys(row, cfg)}
    assert ours == theirs
    published = {"qwen2.5-0.5b": 494_032_768, "qwen3-0.6b": 596_049_920,
                 "mistral-7b-v0.3": 7_248_023_552, "phi-3-mini-4k": 3_821_079_552,
                 "gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952}
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(functional.abstract_params(cfg))) \
        == published[name]
