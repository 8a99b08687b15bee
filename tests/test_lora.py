"""LoRA: neutral at init, merge == adapted forward, PEFT-format export loads in peft with our logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_hf
from jaxalign.convert import hf
from jaxalign.models import functional, lora

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_tiny_hf(d)
    base_cfg, base, hf_config = hf.load(d)
    cfg = base_cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=TARGETS)
    params = lora.add_adapters(cfg, base, seed=1)
    # Random b: a trained adapter, so that every target changes the output.
    adapters, frozen = lora.split(params)
    keys = iter(jax.random.split(jax.random.PRNGKey(3), 64))
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.3 * jax.random.normal(next(keys), x.shape) if p[-1].key == "b" else x, adapters)
    tokens = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    return d, base_cfg, base, cfg, lora.combine(adapters, frozen), tokens


def _logits(cfg, params, tokens, **kw):
    return np.asarray(functional.apply(cfg, params, tokens, **kw)[0])


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_fresh_adapters_leave_model_unchanged(setup):
    d, base_cfg, base, cfg, _, tokens = setup
    fresh = lora.add_adapters(cfg, base, seed=0)
    np.testing.assert_array_equal(_logits(cfg, fresh, tokens), _logits(base_cfg, base, tokens))


def test_split_combine_and_disable(setup):
    _, base_cfg, base, cfg, params, tokens = setup
    adapters, frozen = lora.split(params)
    assert jax.tree.structure(frozen) == jax.tree.structure(base)
    assert set(adapters["layers"]["attn"]) == {"q_lora", "k_lora", "v_lora", "o_lora"}
    assert jax.tree.structure(lora.combine(adapters, frozen)) == jax.tree.structure(params)
    adapted = _logits(cfg, params, tokens)
    assert np.abs(adapted - _logits(base_cfg, base, tokens)).max() > 1e-2
    np.testing.assert_allclose(_logits(cfg, params, tokens, use_lora=False),
                               _logits(base_cfg, base, tokens), atol=1e-6)


def test_merge_equals_adapted_forward(setup):
    _, base_cfg, _, cfg, params, tokens = setup
    merged_cfg, merged = lora.merge(cfg, params)
    assert merged_cfg == base_cfg
    np.testing.assert_allclose(_logits(merged_cfg, merged, tokens), _logits(cfg, params, tokens),
                               atol=2e-5)


def test_dropout_only_with_key(setup):
    _, _, _, cfg, params, tokens = setup
    cfg_d = cfg.replace(lora_dropout=0.5)
    no_key = _logits(cfg_d, params, tokens)
    np.testing.assert_allclose(no_key, _logits(cfg, params, tokens), atol=1e-6)
    with_key = _logits(cfg_d, params, tokens, dropout_key=jax.random.PRNGKey(0))
    assert np.abs(with_key - no_key).max() > 1e-3


def test_peft_adapter_loads_in_peft_with_our_logits(setup, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    d, _, _, cfg, params, tokens = setup
    from jaxalign.convert.peft import save_peft
    save_peft(tmp_path / "adapter", cfg, params, base_model_path=str(d))
    base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(_logits(cfg, params, tokens), ref, atol=1e-4)
