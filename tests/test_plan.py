"""`jaxalign plan`: the memory and collectives it reports agree with arithmetic we can do by
hand, and the 8B table it prints for the README comes from 64 fake devices."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxalign import sharding
from jaxalign.config import ConfigError, LoRAConfig, MeshConfig, ModelSource, OptimConfig, \
    TrainConfig
from jaxalign.data.config import DataConfig, DatasetSpec
from jaxalign.models import functional
from jaxalign.train import plan
from jaxalign.train.dpo import DPOConfig
from jaxalign.train.loop import start_or_resume
from jaxalign.train.optim import make_optimizer
from jaxalign.train.sft import SFTConfig

from conftest import child_xla_flags, make_tiny_hf

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ = 8, 32


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "tiny"
    make_tiny_hf(path, vocab_size=128, tie_word_embeddings=False)
    return str(path)


def _sections(tiny_dir, **model):
    return dict(out_dir="unused", model=ModelSource(path=tiny_dir, scan_layers=True, remat="full",
                                                    **model),
                train=TrainConfig(steps=10, batch_size=BATCH), optim=OptimConfig(),
                data=DataConfig(train=(DatasetSpec(path="unused.jsonl"),), seq_len=SEQ))


def _total_param_bytes(tiny_dir):
    cfg = plan.model_config(tiny_dir)
    return sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(functional.abstract_params(cfg)))


@pytest.fixture(scope="module")
def sft_plans(tiny_dir):
    cfg = SFTConfig(**_sections(tiny_dir))
    return {m: plan.plan_mesh("sft", cfg, plan.parse_meshes(m)[0]) for m in ("fsdp=8", "data=8")}


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_memory_is_the_shards_we_expect(sft_plans, tiny_dir):
    """XLA's own argument size = our per-device shard arithmetic: params, Adam's two moments
    sharded like them (+ two int32 counts), the batch split 8 ways, the step and the rng key."""
    total = _total_param_bytes(tiny_dir)
    fsdp, data = sft_plans["fsdp=8"], sft_plans["data=8"]
    assert data.params_bytes == total                        # data parallel: full replicas
    assert total / 8 <= fsdp.params_bytes < total / 8 * 1.1  # norms stay replicated
    for p in (fsdp, data):
        assert p.optimizer_bytes == 2 * p.params_bytes + 8
        batch_bytes = 5 * BATCH * SEQ * 4 // 8
        assert p.argument_bytes == p.params_bytes + p.optimizer_bytes + batch_bytes + 4 + 8
        assert p.peak_bytes >= p.argument_bytes + p.temp_bytes - p.argument_bytes  # sane
        assert p.temp_bytes > 0 and p.compile_s > 0


def test_collectives_follow_the_mesh(sft_plans, tiny_dir):
    """Data parallel: one all-reduce of the gradients (the full params' bytes) and no
    all-gather of weights; fsdp: weights gathered for the forward and again for the backward."""
    total = _total_param_bytes(tiny_dir)
    data, fsdp = sft_plans["data=8"].collectives, sft_plans["fsdp=8"].collectives
    assert total <= data["all-reduce"] < total * 1.05
    assert data["all-gather"] < total * 0.05
    assert fsdp["all-gather"] >= 1.5 * total


def test_collective_bytes_counts_loop_trips():
    """A psum inside a 5-step scan is 5 all-reduces of its shard, not one."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def body(c, _):
        return jax.lax.psum(c * 1.5, "x"), None

    def f(x):
        return jax.lax.scan(body, x, None, length=5)[0]

    g = jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x"), check_vma=False)
    x = jax.ShapeDtypeStruct((8 * 256,), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    text = jax.jit(g).lower(x).compile().as_text()
    assert plan.collective_bytes(text)["all-reduce"] == 5 * 256 * 4


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_optimizer_moments_are_sharded_like_params(tiny_dir, tmp_path):
    """The run's TrainState: Adam's moments on their params' shardings (a jitted init left
    them replicated: zeros_like has no data dependence on the params)."""
    mesh = sharding.make_mesh(MeshConfig(fsdp=8))
    cfg = plan.model_config(tiny_dir)
    with jax.set_mesh(mesh):
        params = functional.init_params(cfg, mesh)
        optimizer, _ = make_optimizer(OptimConfig(weight_decay=0.1), 10)
        state, state_sh, ckpts, _, _ = start_or_resume(tmp_path, params, optimizer, 0, 1)
        ckpts.close()
    adam = state.opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(moments)):
            assert m.sharding.spec == p.sharding.spec
    assert any(p.sharding.spec != P(*[None] * p.ndim) for p in jax.tree.leaves(adam.mu))


@pytest.mark.slow  # compiles whole train steps for meshes
def test_dpo_plan_holds_the_reference(tiny_dir, sft_plans):
    """Full-parameter DPO: a frozen reference copy beside the policy, and no optimizer state
    for it; with LoRA the reference is the base with adapters off (no copy)."""
    cfg = DPOConfig(**_sections(tiny_dir))
    dpo = plan.plan_mesh("dpo", cfg, MeshConfig(fsdp=8))
    sft = sft_plans["fsdp=8"]
    assert dpo.params_bytes == 2 * sft.params_bytes
    assert dpo.optimizer_bytes == sft.optimizer_bytes
    lora = DPOConfig(**_sections(tiny_dir), lora=LoRAConfig(rank=4, targets=("q_proj", "v_proj")))
    with_lora = plan.plan_mesh("dpo", lora, MeshConfig(fsdp=8))
    assert sft.params_bytes < with_lora.params_bytes < 1.2 * sft.params_bytes
    assert with_lora.optimizer_bytes < 0.2 * sft.optimizer_bytes


def test_candidate_meshes_and_flags():
    cfg = plan.model_config(str(ROOT / "configs" / "arch" / "llama3-8b"))
    meshes = plan.candidate_meshes(64, cfg, batch_size=64)
    assert len(meshes) == 22 and all(math.prod(m.shape) == 64 for m in meshes)
    assert {m.tensor for m in meshes} == {1, 2, 4, 8}          # 8 KV heads
    assert plan.candidate_meshes(64, cfg, batch_size=64, grad_accum=4) == \
        [m for m in meshes if m.data * m.fsdp <= 16]
    assert plan.parse_meshes("fsdp=64; data=4,fsdp=16") == [MeshConfig(data=1, fsdp=64, tensor=1),
                                                          MeshConfig(data=4, fsdp=16, tensor=1)]
    with pytest.raises(ConfigError, match="--meshes"):
        plan.parse_meshes("fsdp=x")
    with pytest.raises(ConfigError, match="not planned yet"):
        plan.planner("ppo")


@pytest.mark.slow  # compiles whole train steps for meshes
def test_cli_plans_an_8b_llama_on_64_fake_devices():
    """The README's table: full SFT of Llama 3 8B's shape on fsdp=64, from its config.json
    alone, in a fresh process (the device count is fixed when JAX starts); `--mesh fsdp=-1`
    plans the one mesh with every device on fsdp."""
    env = dict(os.environ, XLA_FLAGS=child_xla_flags())
    out = subprocess.run([sys.executable, "-m", "jaxalign.cli", "plan",
                          str(ROOT / "configs" / "plan_llama8b.yaml"), "--devices", "64",
                          "--mesh", "fsdp=-1", "--device-memory-gb", "80", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[1].startswith("| data | fsdp | tensor |") and "| yes |" in lines[3]
    (result,) = json.loads(lines[-1])
    cfg = plan.model_config(str(ROOT / "configs" / "arch" / "llama3-8b"))
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_kv_heads * cfg.head_dim
    matrices = L * (2 * D * D + 2 * D * kv + 3 * D * F) + 2 * V * D   # q, o, k, v, mlp; embed, head
    vectors = (2 * L + 1) * D                                         # norm scales: replicated
    assert matrices + vectors == pytest.approx(8.03e9, rel=0.01)
    assert result["params_bytes"] == 4 * matrices // 64 + 4 * vectors
    assert result["optimizer_bytes"] == 2 * result["params_bytes"] + 8
    assert result["peak_bytes"] < 80 * 2**30
    # The weights are gathered at least for the forward and the backward, in fp32.
    assert result["collectives"]["all-gather"] >= 2 * 4 * (matrices - 2 * V * D)
