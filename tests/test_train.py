"""The shared train step and loop, through SFT on a tiny model with SmolLM2's tokenizer."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxalign import sharding
from jaxalign.config import ConfigError, MeshConfig, apply_overrides, from_dict, load_yaml
from jaxalign.data.config import DataConfig
from jaxalign.data.pipeline import build_sft_data
from jaxalign.models import functional
from jaxalign.config import TrainConfig
from jaxalign.train.loop import Task, train
from jaxalign.train.shell import NonFiniteLossError
from jaxalign.config import OptimConfig
from jaxalign.train.optim import make_optimizer
from jaxalign.train.sft import SFTConfig, sft_loss_fn
from jaxalign.train.step import init_state, make_train_step

from conftest import child_xla_flags, sft_config, write_tasks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    from jaxalign.convert import hf
    from jaxalign.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("train")
    model_dir = make_tiny_model(root / "model")
    data = write_tasks(root / "tasks.jsonl")
    cfg, params, _ = hf.load(model_dir)
    tok = load_tokenizer(model_dir)
    return dict(root=root, model_dir=model_dir, data=data, cfg=cfg, params=params, tok=tok)


def _batches(tiny, pack, batch_size, seq_len=64):
    dcfg = DataConfig(train=[{"path": str(tiny["data"])}], seq_len=seq_len, pack=pack, shuffle=False)
    return build_sft_data(dcfg, tiny["tok"], batch_size=batch_size).train


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_packed_loss_equals_unpacked(tiny):
    from jaxalign.data.packing import empty_batch, write_row
    loss_fn = sft_loss_fn(tiny["cfg"])
    examples = [_batches(tiny, pack=False, batch_size=8).datasets[0][j] for j in range(8)]
    pad = tiny["tok"].pad_token_id
    padded, packed = empty_batch(8, 64, pad), empty_batch(2, 256, pad)
    for r, ex in enumerate(examples):
        write_row(padded, r, [ex])
    for r in range(2):  # the same 8 examples, 4 to a row
        write_row(packed, r, examples[4 * r:4 * r + 4])
    assert packed["segment_ids"].max() == 4
    l_pad, m_pad = loss_fn(tiny["params"], {}, padded, None)
    l_pack, m_pack = loss_fn(tiny["params"], {}, packed, None)
    assert float(m_pad["weight"]) == float(m_pack["weight"])
    np.testing.assert_allclose(float(l_pack), float(l_pad), rtol=1e-6)


def _grads(cfg, params, batch, accum):
    opt, sched = make_optimizer(OptimConfig(lr=1e-3, max_grad_norm=None), 10)
    step = make_train_step(sft_loss_fn(cfg), opt, sched, grad_accum=accum)
    state = init_state(params, opt, 0)
    new_state, metrics = jax.jit(step)(state, {}, batch)
    return new_state, metrics


def test_per_row_outputs_come_back_in_row_order():
    """A loss's metrics['rows'] pass through gradient accumulation unaveraged, each row where
    the batch had it (micro batch k holds rows k, k + A, ...), and stay out of the averages."""
    def loss_fn(params, frozen, batch, rng):
        pred = batch["x"] * params["w"]
        return jnp.mean(pred ** 2), {"weight": jnp.float32(batch["x"].shape[0]),
                                     "rows": {"pred": jax.lax.stop_gradient(pred)}}
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    opt = optax.sgd(0.1)
    for accum in (1, 3):
        step = make_train_step(loss_fn, opt, optax.constant_schedule(0.1), grad_accum=accum)
        _, metrics = jax.jit(step)(init_state({"w": jnp.float32(2.0)}, opt, 0), {}, {"x": x})
        np.testing.assert_array_equal(metrics["rows"]["pred"], x * 2)
        assert set(metrics) - {"rows"} == {"loss", "grad_norm", "lr", "weight", "finite",
                                           "state_finite"}


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_accumulation_equals_large_batch(tiny):
    batch = next(_batches(tiny, pack=False, batch_size=8))
    # Uneven token counts per micro-batch (micro-batch k = rows k, k+4): the weighting must
    # be by tokens, not by rows, for the two to agree.
    first = np.argmax(batch["loss_mask"][0])
    batch["loss_mask"][0, first + 1:] = 0
    assert len({int(batch["loss_mask"][i::4].sum()) for i in range(4)}) > 1
    s1, m1 = _grads(tiny["cfg"], tiny["params"], batch, 1)
    s4, m4 = _grads(tiny["cfg"], tiny["params"], batch, 4)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s4.opt_state), jax.tree.leaves(s1.opt_state)):
        scale = max(float(jnp.abs(b).max()), 1e-12)
        assert float(jnp.abs(a - b).max()) / scale <= 1e-5


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_sharded_step_equals_single_device(tiny):
    cfg = tiny["cfg"]
    batch = next(_batches(tiny, pack=False, batch_size=8))
    _, ref = _grads(cfg, tiny["params"], batch, 1)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        shardings = functional.param_shardings(cfg, mesh)
        params = jax.device_put(tiny["params"], shardings)
        assert any(len(s.device_set) > 1 and not s.is_fully_replicated
                   for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, params)))
        from jaxalign.train.loop import put_batch
        _, got = _grads(cfg, params, put_batch(batch, mesh), 1)
    np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-5)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_tiny_model_learns_the_task(tiny):
    from jaxalign.train.sft import run_sft
    out = tiny["root"] / "learn"
    steps = 150
    cfg = sft_config(tiny, out, steps=steps, batch_size=32)
    cfg = dataclasses.replace(cfg, optim=OptimConfig(lr=1e-2, schedule="cosine", warmup_steps=10))
    metrics = run_sft(cfg, devices=jax.devices()[:1])
    # Below 0.05 with unrolled layers and no remat, 0.053 with the CPU default (scanned, full remat):
    # the same math in another order of fp32 round-off, over 150 steps at lr 1e-2.
    assert metrics["loss"] < 0.06 and metrics["token_accuracy"] > 0.99, metrics
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, steps + 1))
    assert lines[0]["loss"] > 5.0  # a random model starts near log(vocab)
    assert (out / "checkpoints" / str(steps)).exists() and (out / "config.yaml").exists()


def test_nan_loss_stops_with_checkpoint_intact(tiny, tmp_path):
    loader = _batches(tiny, pack=False, batch_size=8)
    real_next = loader.__next__
    calls = {"n": 0}

    class Poisoned:
        def __next__(self):
            calls["n"] += 1
            b = real_next()
            if calls["n"] == 3:
                b = dict(b, loss_mask=np.full_like(b["loss_mask"], np.nan))
            return b
        state, restore = loader.state, loader.restore

    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite loss.*checkpoint \(step 2\)"):
        train(run_dir=tmp_path, cfg=TrainConfig(steps=5, batch_size=8, save_every=2, progress=False,
                                                tensorboard=False),
              optim=OptimConfig(lr=1e-3), mesh=mesh, trainable=tiny["params"], frozen={},
              frozen_shardings={}, task=Task(loss_fn=sft_loss_fn(tiny["cfg"]), train_data=Poisoned()))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


class _RecordedSleep:
    """The `time` module as one module sees it, its sleeps also recorded (in that module only:
    other threads' sleeps are not)."""
    def __init__(self, record: list):
        self.record = record

    def __getattr__(self, name):
        return getattr(time, name)

    def sleep(self, seconds):
        self.record.append(seconds)
        time.sleep(seconds)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_cpu_loop_dispatches_each_step_after_the_previous_one(tiny, tmp_path, monkeypatch):
    """On the CPU, XLA allocates a step's temporaries at dispatch: the loop waits for the
    previous step's state before it dispatches the next (else two sets of temporaries stay
    resident): step n waits on the state with n - 1 optimizer steps taken; and, where the
    step's temporaries are large (here: any size), pauses `runtime.SETTLE_S` after that wait,
    while XLA hands them back."""
    from jaxalign import runtime
    from jaxalign.train import loop
    from jaxalign.train.step import TrainState
    waited, real = [], jax.block_until_ready

    def spy(x):
        if isinstance(x, TrainState):
            waited.append(int(real(x).step))   # optimizer steps taken by the awaited state
        return real(x)

    monkeypatch.setattr(loop.jax, "block_until_ready", spy)
    monkeypatch.setattr(runtime, "SETTLE_MIN_BYTES", 0)
    monkeypatch.setattr(loop, "time", _RecordedSleep(waited))
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    train(run_dir=tmp_path, cfg=TrainConfig(steps=4, batch_size=8, progress=False,
                                            tensorboard=False),
          optim=OptimConfig(lr=1e-3), mesh=mesh, trainable=tiny["params"], frozen={},
          frozen_shardings={}, task=Task(loss_fn=sft_loss_fn(tiny["cfg"]),
                                         train_data=_batches(tiny, pack=False, batch_size=8)))
    pause = runtime.SETTLE_S
    assert waited == [0, pause, 1, pause, 2, pause, 3, pause]


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'"):
        from_dict(SFTConfig, {"out_dir": "x", "model": {"path": "m"}, "data": {"train": ["d"]},
                  "train": {"stepz": 3, "steps": 1, "batch_size": 1}})
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimConfig(lr=-1.0)


def test_config_values_take_their_declared_types():
    """YAML 1.1 reads `1e-4` as a string: numeric fields still get numbers; a value of the
    wrong type is refused with its key."""
    base = {"out_dir": "x", "model": {"path": "m"}, "data": {"train": ["d"]}}
    cfg = from_dict(SFTConfig, apply_overrides(base, ["optim.lr=1e-4", "optim.max_grad_norm=1",
                                                      "train.steps=2e1", "train.batch_size=4"]))
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.max_grad_norm == 1.0 and isinstance(cfg.optim.max_grad_norm, float)
    assert cfg.train.steps == 20 and isinstance(cfg.train.steps, int)
    for override, message in (("optim.lr=fast", r"optim.lr: expected a number, got 'fast'"),
                              ("optim.lr=true", r"optim.lr: expected a number, got True"),
                              ("train.steps=2.5", r"train.steps: expected an integer, got 2.5"),
                              ("train.progress=3", r"train.progress: expected true or false, got 3")):
        with pytest.raises(ConfigError, match=message):
            from_dict(SFTConfig, apply_overrides(base, [override, "train.batch_size=4"]))


def _run_cli(config, overrides, env, **kw):
    return subprocess.Popen([sys.executable, "-m", "jaxalign.cli", "sft", str(config), *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_exact_resume_after_sigkill(tiny, tmp_path):
    """20 steps straight vs 10+ steps, SIGKILL, rerun to 20: identical metrics.jsonl."""
    env = dict(os.environ, XLA_FLAGS=child_xla_flags("--xla_force_host_platform_device_count=1"))
    common = [f"model.path={tiny['model_dir']}", f"data.train=[{{path: {tiny['data']}}}]",
              "train.steps=20", "train.save_every=5", "train.tensorboard=false", "train.progress=false"]
    cfg = ROOT / "configs" / "tiny_sft.yaml"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    p = _run_cli(cfg, [f"out_dir={straight}", *common], env)
    q = _run_cli(cfg, [f"out_dir={killed}", *common], env)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 12:
            break
        assert q.poll() is None, q.communicate()[1][-3000:]
        time.sleep(0.05)
    q.send_signal(signal.SIGKILL)
    q.wait()
    assert len(metrics.read_text().splitlines()) < 20
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    r = _run_cli(cfg, [f"out_dir={killed}", *common], env)
    out, err = r.communicate(timeout=300)
    assert r.returncode == 0, err[-3000:]
    assert "resumed" in err
    a = (straight / "metrics.jsonl").read_text()
    b = metrics.read_text()
    assert len(a.splitlines()) == 20
    assert a == b


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_lora_run_on_a_lora_run_keeps_the_base_runs_adapters(tiny, tmp_path):
    """A LoRA run whose model is another LoRA run (RL or a reward model on an SFT run) trains
    on that run's merged weights; loading it (eval, export, a later stage) must give the same
    base, not the untuned weights under its own adapters (which share the base run's names)."""
    from jaxalign.checkpoint import load_run
    from jaxalign.models import lora
    from jaxalign.train.sft import run_sft

    def lora_run(out, path, steps):
        cfg = sft_config(tiny, out, steps=steps, batch_size=8, save_every=steps)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)),
                                  lora=dataclasses.replace(cfg.lora, rank=4, alpha=8.0))
        run_sft(cfg, devices=jax.devices()[:1])
        return out

    first = lora_run(tmp_path / "first", tiny["model_dir"], 3)
    second = lora_run(tmp_path / "second", first, 1)
    _, merged_first = lora.merge(*load_run(first)[:2])
    cfg2, params2, _, _ = load_run(second)
    adapters2, base2 = lora.split(params2)
    assert adapters2 and cfg2.lora_rank == 4
    for a, b in zip(jax.tree.leaves(base2), jax.tree.leaves(merged_first)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(merged_first), jax.tree.leaves(tiny["params"]))]
    assert max(moved) > 1e-4      # the first run's adapters changed its merged weights


@pytest.mark.slow  # over 3 s: outside the fast tier
def test_lora_run_exports_merged_and_peft(tiny, tmp_path):
    """A LoRA SFT run dir -> `jaxalign export` (merged HF dir) and `--adapter` (PEFT): both
    give, in transformers / peft, the logits of the trained jaxalign model."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    from jaxalign import cli
    from jaxalign.checkpoint import load_model
    from jaxalign.train.sft import run_sft

    out = tmp_path / "lora_run"
    cfg = sft_config(tiny, out, steps=6, batch_size=8, save_every=3)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=4, alpha=8.0,
                                                            targets=("q_proj", "v_proj", "down_proj")),
                              optim=OptimConfig(lr=5e-2, schedule="constant"))
    run_sft(cfg, devices=jax.devices()[:1])
    model_cfg, params, _, _ = load_model(out)
    assert model_cfg.lora_rank == 4
    tokens = np.random.default_rng(0).integers(3, 300, (2, 16)).astype(np.int32)
    ours = np.asarray(functional.apply(model_cfg, params, tokens)[0])
    base = np.asarray(functional.apply(model_cfg, params, tokens, use_lora=False)[0])
    assert np.abs(ours - base).max() > 1e-3  # training moved the adapters

    assert cli.main(["export", str(out), str(tmp_path / "merged")]) == 0
    assert cli.main(["export", str(out), str(tmp_path / "adapter"), "--adapter"]) == 0
    x = torch.tensor(tokens, dtype=torch.long)
    merged, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32,
                                                        output_loading_info=True)
    assert not any(info.values()), info
    hf_base = AutoModelForCausalLM.from_pretrained(tiny["model_dir"], dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(x).logits.numpy(), ours, atol=1e-4)
        np.testing.assert_allclose(adapted(x).logits.numpy(), ours, atol=1e-4)


def test_full_finetune_run_loads_without_its_base_folder(tiny, tmp_path):
    """run.json + model/ make a full fine-tune run dir a model source on its own: with the
    starting HF folder deleted it loads (only the params, from the latest checkpoint) with
    the weights the run exported at its end and a working tokenizer."""
    import shutil
    from jaxalign.checkpoint import load_model
    from jaxalign.convert import hf
    from jaxalign.tokenizer import load_tokenizer
    from jaxalign.train.sft import run_sft

    base = tmp_path / "base"
    shutil.copytree(tiny["model_dir"], base)
    out = tmp_path / "run"
    cfg = sft_config(tiny, out, steps=3, batch_size=8, export_hf=True)
    run_sft(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(base))),
            devices=jax.devices()[:1])
    shutil.rmtree(base)
    model_cfg, params, hf_config, tok_dir = load_model(out)
    assert model_cfg.lora_rank == 0 and hf_config["model_type"] == "llama"
    _, exported, _ = hf.load(out / "hf", scan_layers=model_cfg.scan_layers)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exported)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tiny["params"]))]
    assert max(moved) > 1e-4                                    # the trained weights
    assert load_tokenizer(tok_dir).get_vocab() == tiny["tok"].get_vocab()
