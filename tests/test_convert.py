"""HF <-> jaxalign conversion: exact round trips, transformers-loadable exports, sharded
loading, and refusals that name what is wrong (the model-fidelity contract, docs/architecture.md).

No jit compiles here: conversion is numpy, and the exported models are run by transformers.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import jax
from safetensors import safe_open

from conftest import assert_bitwise_equal, make_tiny_hf, read_tensors, save_tiny_tokenizer
from jaxalign import sharding
from jaxalign.config import ConfigError, MeshConfig, ModelConfig
from jaxalign.convert import hf
from jaxalign.convert.hf import CheckpointError
from jaxalign.models import functional

SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja")

SOURCES = {
    "untied_bias_fp32": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
    "tied_fp32": dict(tie_word_embeddings=True),
    "untied_bias_bf16": dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                             torch_dtype=torch.bfloat16),
    "tied_bf16": dict(tie_word_embeddings=True, torch_dtype=torch.bfloat16),
}


def make_source(path, seed=0, torch_dtype=torch.float32, tokenizer=True, **overrides):
    model = make_tiny_hf(path, seed=seed, **overrides)
    if torch_dtype != torch.float32:
        model.to(torch_dtype).save_pretrained(path)
    if tokenizer:
        save_tiny_tokenizer(path)
    return model


@pytest.fixture(scope="module", params=list(SOURCES))
def source(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    make_source(path, seed=3, **SOURCES[request.param])
    return request.param, path


def test_round_trip_is_bitwise_identical(source, tmp_path):
    name, src = source
    cfg, params, hf_config = hf.load(src)
    if "bf16" in name:
        assert hf_config["dtype"] == "bfloat16"
    assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
    out = hf.save(tmp_path / "out", cfg, params, hf_config=hf_config, source_dir=src)

    assert_bitwise_equal(read_tensors(src), read_tensors(out))
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for side in SIDE_FILES:
        assert (src / side).exists(), f"test setup: {side} missing from the source"
        assert (out / side).read_bytes() == (src / side).read_bytes(), f"{side} not carried over"


@pytest.mark.parametrize("source", ["untied_bias_bf16", "tied_bf16"], indirect=True)
def test_bf16_round_trip_through_bf16_params(source, tmp_path):
    """bf16 params (no fp32 detour) also give back the exact bytes."""
    _, src = source
    cfg, params, hf_config = hf.load(src, param_dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    out = hf.save(tmp_path / "out", cfg, params, hf_config=hf_config, source_dir=src)
    assert_bitwise_equal(read_tensors(src), read_tensors(out))


# ----------------------------------------------------------------------------- exports that transformers loads

TOKENS = torch.tensor(np.random.default_rng(0).integers(3, 96, (2, 17)))


def hf_load_checked(path):
    from transformers import AutoModelForCausalLM
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[kind], f"transformers loading {path}: {kind} = {info[kind]}"
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_sharded_export_loads_in_transformers(tmp_path, tied):
    src = tmp_path / "src"
    ref_model = make_source(src, seed=5, tie_word_embeddings=tied, attention_bias=not tied)
    cfg, params, hf_config = hf.load(src)
    out = hf.save(tmp_path / "out", cfg, params, hf_config=hf_config, source_dir=src,
                  max_shard_bytes=40_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3, f"expected several shards at 40 kB, got {shards}"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in read_tensors(out).values())
    assert_bitwise_equal(read_tensors(src), read_tensors(out))

    model = hf_load_checked(out)
    assert torch.equal(logits(model), logits(ref_model))
    assert model.config.tie_word_embeddings == tied
    same_storage = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same_storage == tied, "tied embeddings must stay tied (and untied ones untied)"

    # And our own loader reads the sharded layout back to the same params.
    _, params2, _ = hf.load(out)
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_export_dtype_bfloat16_writes_bf16(tmp_path):
    """`jaxalign export --dtype bfloat16`: bf16 tensors (each the fp32 weight rounded as torch
    rounds it), config.json saying so, and transformers' logits on them within bf16 round-off
    of ours on the fp32 model (and within the fp32 contract of ours on the same bf16 file)."""
    from jaxalign import cli
    src, out = tmp_path / "src", tmp_path / "out"
    make_source(src, seed=6, tie_word_embeddings=False, attention_bias=True)
    assert cli.main(["export", str(src), str(out), "--dtype", "bfloat16"]) == 0

    fp32, bf16 = read_tensors(src), read_tensors(out)
    assert sorted(fp32) == sorted(bf16)
    for k in fp32:
        assert bf16[k].dtype == torch.bfloat16, f"{k}: written as {bf16[k].dtype}"
        assert torch.equal(bf16[k], fp32[k].to(torch.bfloat16)), f"{k}: not the rounded weight"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # its own dtype
    theirs = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()).numpy()
    apply = jax.jit(lambda c, p: functional.apply(c, p, TOKENS.numpy())[0], static_argnums=0)
    cfg, params, _ = hf.load(src)
    ours = np.asarray(apply(cfg, params))
    scale = float(np.abs(ours).max())
    err = float(np.abs(theirs - ours).max())
    # bf16 keeps 8 significant bits (relative round-off 2^-9 per weight); through two layers
    # the logits move by a few of those relative to their scale, never by more than 2^-5.
    assert 1e-4 * scale < err < 2**-5 * scale, (err, scale)
    cfg16, params16, _ = hf.load(out)   # read back as fp32 params: the same numbers
    ours16 = np.asarray(apply(cfg16, params16))
    assert float(np.abs(theirs - ours16).max()) < 1e-4 * scale


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True, head_dim=24,
         num_key_value_heads=1,
         rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                              high_freq_factor=4.0, original_max_position_embeddings=16)),
    dict(tie_word_embeddings=True, rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0)),
], ids=["llama3_bias_untied", "linear_tied"])
def test_export_without_source_config(tmp_path, overrides):
    """An export with no source config.json (e.g. a model trained from a jaxalign config)
    writes one that transformers reads as the same architecture."""
    src = tmp_path / "src"
    ref_model = make_source(src, seed=9, tokenizer=False, **overrides)
    cfg, params, _ = hf.load(src)
    out = hf.save(tmp_path / "out", cfg, params)
    written = json.loads((out / "config.json").read_text())
    assert ModelConfig.from_hf(written) == cfg
    model = hf_load_checked(out)
    assert model.config.rope_parameters["rope_type"] == cfg.rope_type
    torch.testing.assert_close(logits(model), logits(ref_model), rtol=0, atol=0)
    assert_bitwise_equal(read_tensors(src), read_tensors(out))


def test_transformers4_config_layout_reads_the_same():
    """transformers 4 wrote `rope_theta` + `rope_scaling` instead of `rope_parameters`."""
    v5 = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}}
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4["rope_theta"] = 5e5
    v4["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
    assert ModelConfig.from_hf(v5).rope_theta == 5e5


# ----------------------------------------------------------------------------- loading onto a mesh

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    make_source(path, seed=1, attention_bias=True, mlp_bias=True)
    return path


def test_load_onto_mesh(base_dir):
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg, params, _ = hf.load(base_dir, mesh)
    _, ref, _ = hf.load(base_dir)
    expected = functional.param_shardings(cfg, mesh)
    flat = jax.tree_util.tree_leaves_with_path(params)
    assert len(flat) == len(jax.tree.leaves(expected))
    for path, x in flat:
        want = expected
        for p in path:
            want = want[p.key]
        name = jax.tree_util.keystr(path)
        assert x.sharding == want, f"{name}: sharding {x.sharding.spec} != {want.spec}"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(ref_value(ref, path)), err_msg=name)
    # Not everything silently replicated: the big weights are split over fsdp and tensor.
    assert params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert params["layers"]["attn"]["q"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    shard = params["layers"]["mlp"]["up"].addressable_shards[0].data
    assert shard.shape == (cfg.num_layers, cfg.hidden_size // 2, cfg.intermediate_size // 2)


def ref_value(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


# ----------------------------------------------------------------------------- refusals

def broken_copy(base_dir, tmp_path, edit_config=None):
    dst = tmp_path / "broken"
    shutil.copytree(base_dir, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def numpy_tensors(file):
    with safe_open(str(file), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def edit_tensors(path, edit):
    tensors = numpy_tensors(path / "model.safetensors")
    edit(tensors)
    hf.write_tensors(tensors, path / "model.safetensors")


def refused(path, *fragments):
    with pytest.raises(CheckpointError) as err:
        hf.load(path)
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, f"error message does not name {frag!r}: {msg}"
    return msg


@pytest.mark.parametrize("model_type", ["mistral", "gpt2"])
def test_refuses_other_architectures(base_dir, tmp_path, model_type):
    path = broken_copy(base_dir, tmp_path, lambda c: c.update(model_type=model_type))
    refused(path, repr(model_type), "model_type", "config.json")


@pytest.mark.parametrize("edit,name", [
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "yarn"),
    (lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "dynamic"),
    # transformers 4 layout: rope_scaling with the old "type" key.
    (lambda c: (c.pop("rope_parameters"), c.update(rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0})),
     "dynamic"),
    # Both keys: transformers lets `rope_scaling` win (modeling_rope_utils.convert_rope_params_to_dict).
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
     "low_freq_factor"),
    (lambda c: c.update(hidden_act="gelu"), "gelu"),
], ids=["yarn", "dynamic", "dynamic_v4", "rope_scaling_wins", "llama3_incomplete", "gelu"])
def test_refuses_unsupported_config(base_dir, tmp_path, edit, name):
    path = broken_copy(base_dir, tmp_path, edit)
    refused(path, name)


def test_refuses_heads_not_multiple_of_kv_heads():
    with pytest.raises(ConfigError, match=r"num_heads \(4\).*num_kv_heads \(3\)"):
        ModelConfig.from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 16,
                             "intermediate_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "num_key_value_heads": 3})


def test_refuses_missing_tensor(base_dir, tmp_path):
    path = broken_copy(base_dir, tmp_path)
    key = "model.layers.1.self_attn.v_proj.weight"
    edit_tensors(path, lambda t: t.pop(key))
    refused(path, repr(key), "missing")


def test_refuses_unexpected_tensor(base_dir, tmp_path):
    path = broken_copy(base_dir, tmp_path)
    key = "model.layers.0.self_attn.q_norm.weight"
    edit_tensors(path, lambda t: t.update({key: np.ones(16, np.float32)}))
    refused(path, repr(key), "unexpected")


def test_refuses_misshaped_tensor(base_dir, tmp_path):
    path = broken_copy(base_dir, tmp_path)
    key = "model.layers.0.mlp.up_proj.weight"
    edit_tensors(path, lambda t: t.update({key: np.zeros((64, 112), np.float32)}))
    refused(path, repr(key), "(64, 112)", "(112, 64)")


def test_refuses_missing_config(base_dir, tmp_path):
    path = broken_copy(base_dir, tmp_path)
    (path / "config.json").unlink()
    refused(path, "config.json", "missing")


def test_refuses_missing_weights_file(base_dir, tmp_path):
    path = broken_copy(base_dir, tmp_path)
    (path / "model.safetensors").unlink()
    refused(path, "model.safetensors")


def test_refuses_index_naming_missing_shard(base_dir, tmp_path):
    cfg, params, hf_config = hf.load(base_dir)
    out = hf.save(tmp_path / "sharded", cfg, params, hf_config=hf_config, max_shard_bytes=40_000)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.unlink()
    refused(out, shard.name, "model.safetensors.index.json")


def test_refuses_index_naming_tensor_absent_from_its_shard(base_dir, tmp_path):
    cfg, params, hf_config = hf.load(base_dir)
    out = hf.save(tmp_path / "sharded", cfg, params, hf_config=hf_config, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})
    index["weight_map"][key] = others[0]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(out, repr(key), others[0])


def test_tied_checkpoint_with_stored_head(tmp_path):
    """Some writers store lm_head.weight although the embeddings are tied. transformers then
    uses the stored head, so we accept it only when it equals the embedding."""
    src = tmp_path / "src"
    make_source(src, seed=2, tie_word_embeddings=True, tokenizer=False)
    embed = numpy_tensors(src / "model.safetensors")["model.embed_tokens.weight"]
    edit_tensors(src, lambda t: t.update({"lm_head.weight": embed.copy()}))
    cfg, params, _ = hf.load(src)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    np.testing.assert_array_equal(np.asarray(params["embed"]), embed)

    edit_tensors(src, lambda t: t.update({"lm_head.weight": embed + 1}))
    refused(src, "'lm_head.weight'", "tie")
