"""Reward models (HF LlamaForSequenceClassification, `cfg.num_labels > 0`): scores against
transformers with left and right padding and with pad == eos, export / import round trips
(HF RM, causal LM turned into an RM, jaxalign checkpoint), sharding, refusals.

One jit compile per (config, batch shape): `_score` takes the config as a static argument
and every test uses the same (B, T).
"""

import json
import logging
import shutil

import numpy as np
import pytest
import torch

import jax
from jax.sharding import PartitionSpec as P

from conftest import assert_bitwise_equal, make_tiny_hf, read_tensors, save_tiny_tokenizer
from jaxalign import checkpoint, sharding
from jaxalign.config import ConfigError, MeshConfig, ModelConfig
from jaxalign.convert import hf
from jaxalign.convert.hf import CheckpointError
from jaxalign.models import functional, heads
from jaxalign.models.llama import score_init_std

FP32_TOL = 1e-4       # the model-fidelity contract
SHARDED_TOL = 1e-5    # sharded vs one device: summation order only
PAD, EOS = 0, 2
TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128, initializer_range=0.2, bos_token_id=1,
            eos_token_id=EOS, pad_token_id=PAD)

B, T = 4, 16
# Per row: (left padding, real tokens); the rest of the row is right padding.
ROWS = [(5, 11), (0, 9), (0, T), (12, 4)]
KINDS = ["left padding", "right padding", "no padding", "left padding, 4 tokens"]


def make_tiny_rm(path, seed=0, num_labels=1, **overrides):
    """A random transformers LlamaForSequenceClassification (fp32) saved to `path`; norms
    perturbed as in conftest.make_tiny_hf so that a skipped or transposed one shows."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(
        LlamaConfig(**{**TINY, "num_labels": num_labels, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def padded_batch(seed=0, pad=PAD, last=None):
    """Tokens and mask for ROWS; real tokens avoid ids 0-2 (pad, bos, eos) unless `last`
    sets each row's final real token (e.g. an eos)."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, T), pad, np.int32)
    mask = np.zeros((B, T), np.int32)
    for r, (left, n) in enumerate(ROWS):
        tokens[r, left:left + n] = rng.integers(3, 96, n)
        if last is not None:
            tokens[r, left + n - 1] = last
        mask[r, left:left + n] = 1
    return tokens, mask


def hf_scores(model, tokens, mask):
    """transformers' pooled logits (B, L), positions 0.. from each row's first real token."""
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()


_score = jax.jit(heads.score, static_argnums=0)


def ours(cfg, params, tokens, mask):
    return np.asarray(_score(cfg, params, tokens, mask))


def assert_rows_close(got, ref, tol, what):
    for r, kind in enumerate(KINDS):
        d = float(np.abs(got[r] - ref[r]).max())
        assert d <= tol, f"{what}: row {r} ({kind}) differs by {d:.3g} > {tol}"


def hf_load_rm(path):
    from transformers import AutoModelForSequenceClassification
    model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"transformers loading {path}: {kind} = {info[kind]}"
    return model.eval()


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    model = make_tiny_rm(path, seed=7)
    return path, model


# ----------------------------------------------------------------------------- scores vs transformers

def test_scores_match_transformers_left_and_right_padding(rm_dir):
    path, model = rm_dir
    cfg, params, _ = hf.load(path)
    assert cfg.num_labels == 1 and "score" in params and "lm_head" not in params
    assert params["score"].shape == (cfg.hidden_size, 1)
    tokens, mask = padded_batch()
    got = ours(cfg, params, tokens, mask)
    ref = hf_scores(model, tokens, mask)[:, 0]
    assert got.shape == (B,) and got.dtype == np.float32
    assert np.abs(ref).max() > 1.0 and np.ptp(ref) > 1.0, f"scores {ref} too small to test 1e-4"
    assert_rows_close(got, ref, FP32_TOL, "ours vs transformers")


def test_pad_equals_eos_scores_as_transformers(tmp_path):
    """pad == eos and rows ending in eos, left and right padding in one batch: ours equals
    transformers' padded answer (the rightmost token != pad id, i.e. the token before the
    final eos), not the score of the sequence alone with its eos as the last token."""
    model = make_tiny_rm(tmp_path, seed=8, pad_token_id=EOS)
    cfg, params, _ = hf.load(tmp_path)
    assert cfg.pad_token_id == EOS
    tokens, mask = padded_batch(seed=1, pad=EOS, last=EOS)
    got = ours(cfg, params, tokens, mask)
    assert_rows_close(got, hf_scores(model, tokens, mask)[:, 0], FP32_TOL, "ours vs transformers")

    model.config.pad_token_id = None    # batch of one, no pad id: transformers takes index -1
    alone = np.array([hf_scores(model, tokens[r:r + 1, mask[r] > 0], mask[r:r + 1, mask[r] > 0])[0, 0]
                      for r in range(B)])
    assert np.abs(got - alone).min() > 1e-2, (got, alone)   # so the rule above is what decides


def test_pad_equals_eos_scores_equal_trl_get_reward(tmp_path):
    """TRL's RL reward (trl.experimental.utils.get_reward: the token before the first pad of
    the response; mask = ids != pad) on prompt + response rows with pad == eos: left-padded
    prompts, responses ending in eos then padding, one running out of room, one that is
    only an eos. Ours, on the same ids with the same mask, scores the same token."""
    import os
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")   # we pin trl; the API is known
    from trl.experimental.utils import get_reward
    model = make_tiny_rm(tmp_path, seed=14, pad_token_id=EOS)
    cfg, params, _ = hf.load(tmp_path)
    rng = np.random.default_rng(15)
    ctx = 6
    tokens = np.full((B, T), EOS, np.int32)
    for r, (prompt, response) in enumerate([(6, 10), (4, 5), (2, 3), (5, 1)]):
        tokens[r, ctx - prompt:ctx] = rng.integers(3, 96, prompt)
        tokens[r, ctx:ctx + response] = rng.integers(3, 96, response)
        if ctx + response < T or r == 3:
            tokens[r, ctx + response - 1] = EOS          # ended by eos, then pad (= eos)
    with torch.no_grad():
        _, theirs, idx = get_reward(model, torch.tensor(tokens, dtype=torch.long), EOS, ctx)
    np.testing.assert_array_equal(idx.numpy(), [15, 9, 7, 5])
    np.testing.assert_array_equal(heads.scored_token_index(tokens, tokens != EOS, EOS), [15, 9, 7, 5])
    got = ours(cfg, params, tokens, (tokens != EOS).astype(np.int32))
    assert np.abs(theirs.numpy()).max() > 0.5, theirs
    np.testing.assert_allclose(got, theirs.numpy(), atol=FP32_TOL)


def test_multi_label_scores_match_transformers(tmp_path):
    model = make_tiny_rm(tmp_path, seed=9, num_labels=3, tie_word_embeddings=True)
    cfg, params, _ = hf.load(tmp_path)
    assert cfg.num_labels == 3 and params["score"].shape == (cfg.hidden_size, 3)
    tokens, mask = padded_batch(seed=2)
    got = ours(cfg, params, tokens, mask)
    assert got.shape == (B, 3)
    assert_rows_close(got, hf_scores(model, tokens, mask), FP32_TOL, "3 labels")


def test_scored_token_index():
    """The rightmost real token whose id is not the pad id (2 here); 0 when there is none."""
    seg = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 2, 2, 0],
                    [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    tok = np.array([[2, 2, 5, 6, 2], [5, 2, 7, 2, 2], [5, 6, 7, 8, 9], [5, 6, 7, 8, 2],
                    [2, 2, 2, 2, 2], [2, 2, 2, 2, 9]])
    np.testing.assert_array_equal(heads.scored_token_index(tok, seg, 2), [3, 2, 4, 3, 0, 0])
    np.testing.assert_array_equal(heads.scored_token_index(tok, seg, None), [4, 2, 4, 3, 0, 3])
    # transformers' own rule on the same rows (padding filled with the pad id)
    ids = np.where(seg > 0, tok, 2)
    np.testing.assert_array_equal((np.arange(5) * (ids != 2)).argmax(-1), [3, 2, 4, 3, 0, 0])


def test_classifier_has_no_vocab_logits(rm_dir):
    cfg, params, _ = hf.load(rm_dir[0])
    with pytest.raises(ConfigError, match="return_logits=False"):
        functional.apply(cfg, params, np.ones((1, 4), np.int32))
    lm_cfg = cfg.replace(num_labels=0)
    with pytest.raises(ConfigError, match="add_score_head"):
        heads.score(lm_cfg, params, np.ones((1, 4), np.int32), np.ones((1, 4), np.int32))


# ----------------------------------------------------------------------------- round trips

def test_hf_rm_round_trip_is_bitwise_identical(rm_dir, tmp_path):
    src, _ = rm_dir
    cfg, params, hf_config = hf.load(src)
    out = hf.save(tmp_path / "out", cfg, params, hf_config=hf_config, source_dir=src)
    assert_bitwise_equal(read_tensors(src), read_tensors(out))
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    # And through a jaxalign checkpoint: same config, same params.
    saved = checkpoint.save_model(tmp_path / "ja", cfg, params, hf_config, source_dir=src)
    cfg2, params2, hf_config2, _ = checkpoint.load_model(saved)
    assert cfg2 == cfg and hf_config2 == hf_config
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_causal_lm_to_rm_export_loads_in_transformers(tmp_path):
    """An HF causal LM read as a reward model (LM head dropped, score initialised), exported,
    read by AutoModelForSequenceClassification: same scores, no missing / unexpected keys."""
    src = tmp_path / "src"
    make_tiny_hf(src, seed=3, pad_token_id=None)   # the pad id comes from the tokenizer
    save_tiny_tokenizer(src)                        # pad token 'w0' = id 0
    cfg, params, hf_config, tok_dir = checkpoint.load_model(src, num_labels=1, seed=4)
    assert cfg.num_labels == 1 and "lm_head" not in params
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"]
    assert ModelConfig.from_hf(hf_config) == cfg
    std = float(np.std(np.asarray(params["score"])))
    assert 0.5 < std / score_init_std(cfg.hidden_size) < 1.5, std
    # Everything but the head is the LM's.
    _, lm_params, _ = hf.load(src)
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in lm_params.items() if k != "lm_head"},
                 {k: v for k, v in params.items() if k != "score"})

    out = hf.save(tmp_path / "out", cfg, params, hf_config=hf_config, source_dir=tok_dir)
    model = hf_load_rm(out)
    assert model.config.architectures == ["LlamaForSequenceClassification"]
    assert model.config.num_labels == 1 and model.config.pad_token_id == PAD
    for side in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / side).read_bytes() == (src / side).read_bytes(), f"{side} not carried over"
    # Scale up the head so that 1e-4 is a real bound (the fresh head gives scores ~0.3).
    params = dict(params, score=params["score"] * 10)
    out = hf.save(tmp_path / "out10", cfg, params, hf_config=hf_config, source_dir=tok_dir)
    model = hf_load_rm(out)
    tokens, mask = padded_batch(seed=3)
    ref = hf_scores(model, tokens, mask)[:, 0]
    assert np.abs(ref).max() > 1.0, ref
    assert_rows_close(ours(cfg, params, tokens, mask), ref, FP32_TOL, "exported RM")

    # And back: our reader takes the exported RM's score weight as is.
    cfg2, params2, _ = hf.load(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def one_sided_batch(side, seed):
    """pad == eos, every row padded on one side: rows ending in eos, one with an eos inside."""
    rng = np.random.default_rng(seed)
    tokens = np.full((B, T), EOS, np.int32)
    mask = np.zeros((B, T), np.int32)
    for r, n in enumerate([11, 9, T, 4]):
        real = rng.integers(3, 96, n)
        if r in (0, 1):
            real[-1] = EOS
        if r == 2:
            real[5] = EOS
        span = slice(T - n, T) if side == "left" else slice(0, n)
        tokens[r, span], mask[r, span] = real, 1
    return tokens, mask


def test_exported_rm_with_pad_equal_to_eos_scores_as_in_transformers(tmp_path, caplog):
    """A causal LM whose pad id is its eos (SmolLM2's config) made a reward model by
    jaxalign and exported: LlamaForSequenceClassification gives our scores on left- and on
    right-padded batches, and the export has nothing to warn about."""
    src = tmp_path / "src"
    make_tiny_hf(src, seed=11, pad_token_id=EOS)
    cfg, params, hf_config, _ = checkpoint.load_model(src, num_labels=1, seed=12)
    assert cfg.pad_token_id == EOS
    params = dict(params, score=params["score"] * 10)     # scores of order 1: 1e-4 means something
    caplog.set_level(logging.WARNING, logger="jaxalign")
    out = hf.save(tmp_path / "out", cfg, params, hf_config=hf_config)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    model = hf_load_rm(out)
    assert model.config.pad_token_id == EOS == model.config.eos_token_id
    for side in ("left", "right"):
        tokens, mask = one_sided_batch(side, seed=13)
        ref = hf_scores(model, tokens, mask)[:, 0]
        assert np.abs(ref).max() > 1.0, ref
        assert_rows_close(ours(cfg, params, tokens, mask), ref, FP32_TOL, f"{side}-padded")


def test_export_without_source_config(rm_dir, tmp_path):
    """A config.json built from cfg alone (pad id given) is a classifier transformers reads."""
    cfg, params, _ = hf.load(rm_dir[0])
    out = hf.save(tmp_path / "out", cfg, params, pad_token_id=PAD)
    written = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_hf(written) == cfg
    assert written["architectures"] == ["LlamaForSequenceClassification"]
    assert written["pad_token_id"] == PAD and written["id2label"] == {"0": "LABEL_0"}
    model = hf_load_rm(out)
    tokens, mask = padded_batch()
    assert_rows_close(hf_scores(model, tokens, mask)[:, 0], hf_scores(rm_dir[1], tokens, mask)[:, 0],
                      0.0, "exported vs source model")


def test_export_without_pad_token_is_refused(tmp_path):
    src = tmp_path / "src"
    make_tiny_hf(src, seed=5, pad_token_id=None)    # and no tokenizer
    cfg, params, hf_config, _ = checkpoint.load_model(src, num_labels=1)
    with pytest.raises(CheckpointError) as err:
        hf.save(tmp_path / "out", cfg, params, hf_config=hf_config, source_dir=src)
    assert "pad_token_id=" in str(err.value) and "pad_token_id in the source config.json" in str(err.value)
    assert not (tmp_path / "out").exists(), "nothing may be written before the refusal"
    out = hf.save(tmp_path / "out", cfg, params, hf_config=hf_config, pad_token_id=EOS)
    assert hf_load_rm(out).config.pad_token_id == EOS


# ----------------------------------------------------------------------------- sharding

def test_score_sharded_equals_single_device(rm_dir, tmp_path):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    path, _ = rm_dir
    cfg, params, _ = hf.load(path, mesh)
    assert params["score"].sharding.spec == P("fsdp", None)
    _, ref_params, _ = hf.load(path)
    tokens, mask = padded_batch()
    ref = ours(cfg, ref_params, tokens, mask)

    batch_sh = sharding.batch_sharding(mesh, 2, tokens.shape)
    fwd = jax.jit(lambda p, t, s: heads.score(cfg, p, t, s),
                  in_shardings=(functional.param_shardings(cfg, mesh), batch_sh, batch_sh))
    with jax.set_mesh(mesh):
        got = fwd(params, jax.device_put(tokens, batch_sh), jax.device_put(mask, batch_sh))
    assert_rows_close(np.asarray(got), ref, SHARDED_TOL, "sharded vs one device")

    # A head added to a causal LM on the mesh is born on its sharding.
    lm = tmp_path / "lm"
    make_tiny_hf(lm, seed=6)
    cfg2, params2, _, _ = checkpoint.load_model(lm, mesh, num_labels=1)
    want = functional.param_shardings(cfg2, mesh)
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding, s), params2, want)
    assert params2["score"].sharding.spec == P("fsdp", None)


# ----------------------------------------------------------------------------- refusals

def _copy_with(src, dst, edit_config=None):
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit,fragments", [
    (lambda c: c.update(architectures=["LlamaForTokenClassification"]),
     ["LlamaForTokenClassification", "architectures", "config.json"]),
    (lambda c: c.update(architectures=["LlamaForQuestionAnswering"]), ["LlamaForQuestionAnswering"]),
    (lambda c: c.update(model_type="mistral"), ["'mistral'", "model_type"]),
], ids=["token_classification", "question_answering", "mistral"])
def test_refuses_other_kinds(rm_dir, tmp_path, edit, fragments):
    path = _copy_with(rm_dir[0], tmp_path / "broken", edit)
    with pytest.raises(CheckpointError) as err:
        hf.load(path)
    for frag in fragments:
        assert frag in str(err.value), f"error does not name {frag!r}: {err.value}"


def test_refuses_mismatched_heads(rm_dir, tmp_path):
    # A classifier config over causal-LM tensors: the score is missing, lm_head unexpected.
    lm = tmp_path / "lm"
    make_tiny_hf(lm, seed=2)
    path = _copy_with(lm, tmp_path / "as_rm", lambda c: c.update(
        architectures=["LlamaForSequenceClassification"], id2label={"0": "LABEL_0"}))
    with pytest.raises(CheckpointError, match="'score.weight' is missing"):
        hf.load(path)
    # Asking an RM for another label count, or a runtime num_labels, is refused by name.
    with pytest.raises(checkpoint.ModelSourceError, match="1 label"):
        checkpoint.load_model(rm_dir[0], num_labels=2)
    with pytest.raises(CheckpointError, match="num_labels"):
        hf.load(lm, num_labels=1)


def test_num_labels_from_config():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    rm = {**base, "architectures": ["LlamaForSequenceClassification"]}
    assert ModelConfig.from_hf(base).num_labels == 0
    assert ModelConfig.from_hf({**base, "architectures": ["LlamaForCausalLM"],
                                "id2label": {"0": "a", "1": "b"}}).num_labels == 0
    assert ModelConfig.from_hf({**rm, "id2label": {"0": "a", "1": "b", "2": "c"}}).num_labels == 3
    # transformers 5 lets num_labels win over id2label; with neither it defaults to 2.
    assert ModelConfig.from_hf({**rm, "num_labels": 1, "id2label": {"0": "a", "1": "b"}}).num_labels == 1
    assert ModelConfig.from_hf(rm).num_labels == 2
