"""bf16 training (`model.dtype: bfloat16`: fp32 master weights and optimizer, bf16 matmuls
with fp32 accumulation and loss) for every recipe, full and LoRA, on the tiny model: each run
trains a few steps in bf16 and in fp32 from the same start on the same batches, and the bf16
loss curve must track the fp32 one and go down. Also: every matmul of a bf16 train step
compiles to the form XLA's CPU backend runs as a bf16 dot (the fast kernel; the other forms
are upcast to fp32, or refused at run time), and `model.param_dtype: bfloat16` trains."""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.config import ModelConfig, from_dict, load_yaml
from jaxalign.train.recipes import RECIPES

pytestmark = pytest.mark.slow  # trains every recipe in bf16 and fp32

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name: (command, tiny config, overrides). Few short steps each: the fp32 twin doubles the cost.
# The DPO variants share DPO's model path (only the loss array function differs): ORPO stands
# for the reference-free ones.
SUPERVISED = {
    "sft": ("sft", "tiny_sft.yaml", []),
    "sft_lora": ("sft", "tiny_sft.yaml", ["lora.rank=8", "lora.targets=[q_proj,v_proj,down_proj]"]),
    "rm": ("rm", "tiny_rm.yaml", ["train.export_hf=false"]),
    "dpo": ("dpo", "tiny_dpo.yaml", []),
    "dpo_lora": ("dpo", "tiny_dpo.yaml", ["lora.rank=8", "dpo.loss_type=ipo"]),
    "orpo": ("dpo", "tiny_orpo.yaml", []),
    "kto": ("kto", "tiny_kto.yaml", []),
}
RL = {
    "ppo": ("ppo", "tiny_ppo.yaml", ["rollout.batch_size=8"]),
    "grpo": ("ppo", "tiny_ppo.yaml", ["algorithm=grpo", "rollout.batch_size=2",
                                      "rollout.num_generations=4"]),
    "rloo_lora": ("ppo", "tiny_rloo.yaml", ["lora.rank=8"]),
}
STEPS = 4
ITERATIONS = 2
# Small shapes: bf16 against fp32 needs no long rows (the tiny configs' 192-256 fit every row).
SHAPE = ["train.batch_size=8", "data.seq_len=128"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    from jaxalign.synth import prefs, tasks
    root = tmp_path_factory.mktemp("bf16")
    tasks.write_splits(root / "tasks", 96, 8)
    prefs.write_splits(root / "prefs", 96, 16)
    prefs.write_splits(root / "prefs_unpaired", 96, 16, unpaired=True)
    return root, make_tiny_model(root / "model")


def _data_overrides(root: Path, command: str, config: str) -> list[str]:
    if command == "ppo":
        return [f"data.prompts={root / 'tasks/train.jsonl'}"]
    if command == "sft":
        return [f"data.train=[{root / 'tasks/train.jsonl'}]"]
    split = "prefs_unpaired" if command == "kto" else "prefs"
    return [f"data.train=[{root / split / 'train.jsonl'}]", "data.eval=[]"]


def _run(tiny, tmp_path: Path, case: tuple, dtype: str, extra=()) -> list[dict]:
    root, model = tiny
    command, config, overrides = case
    length = [f"train.iterations={ITERATIONS}"] if command == "ppo" else [
        f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", *SHAPE]
    out = tmp_path / dtype
    raw = load_yaml(str(CONFIGS / config), [
        f"out_dir={out}", f"model.path={model}", f"model.dtype={dtype}", "train.save_every=0",
        *_data_overrides(root, command, config), *length, *overrides, *extra])
    config_cls, run = RECIPES[command].load()
    run(from_dict(config_cls, raw), raw, jax.devices()[:1])
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(SUPERVISED))
def test_bf16_tracks_fp32(tiny, tmp_path, name):
    fp32 = [r["loss"] for r in _run(tiny, tmp_path, SUPERVISED[name], "float32") if "loss" in r]
    bf16 = [r["loss"] for r in _run(tiny, tmp_path, SUPERVISED[name], "bfloat16") if "loss" in r]
    assert len(bf16) == len(fp32) == STEPS
    fp32, bf16 = np.array(fp32), np.array(bf16)
    # The first step sees the same weights and batch: only the matmuls' rounding differs.
    assert abs(bf16[0] - fp32[0]) <= 0.01 * abs(fp32[0]) + 1e-3, (fp32, bf16)
    # Later steps compound it through the updates; still within a few percent of the curve.
    assert np.all(np.abs(bf16 - fp32) <= 0.05 * np.abs(fp32) + 0.02), (fp32, bf16)
    assert bf16[-1] < bf16[0], bf16   # and it learns


@pytest.mark.parametrize("name", list(RL))
def test_bf16_rl_tracks_fp32(tiny, tmp_path, name):
    fp32 = _run(tiny, tmp_path, RL[name], "float32")
    bf16 = _run(tiny, tmp_path, RL[name], "bfloat16")
    assert [r["step"] for r in bf16] == [r["step"] for r in fp32] == [1, 2]
    for r in bf16:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, (int, float))), r
    # Rollouts are sampled, so rewards differ; what the policy is (its entropy over the
    # sampled tokens, as the rollout and the training forward measure it) must not.
    for key in ("entropy", "train_entropy"):
        for a, b in zip(fp32, bf16):
            assert abs(b[key] - a[key]) <= 0.02 * abs(a[key]), (key, a[key], b[key])
    # The rollout's log-probs (bf16 decode) and the training forward's agree.
    assert all(abs(r["logprob_gap"]) < 0.05 for r in bf16), [r["logprob_gap"] for r in bf16]


@pytest.mark.parametrize("name,dtype,extra,rounds", [
    ("sft", "bfloat16", [], True), ("sft", "bfloat16", ["train.stochastic_rounding=false"], False),
    ("sft", "float32", [], False), ("ppo", "bfloat16", [], True),
    ("ppo", "bfloat16", ["train.stochastic_rounding=false"], False)])
def test_runs_read_weights_rounded_stochastically(tiny, tmp_path, monkeypatch, name, dtype, extra,
                                                  rounds):
    """A bf16 run's steps (supervised train and eval, the RL update) read the trainable weights
    through `round_params` (tests/test_rounding.py: what that changes); fp32 runs and
    `train.stochastic_rounding=false` do not."""
    import collections
    from jaxalign.train import step
    from jaxalign.train.rl import programs
    traced = []
    real = step.round_params
    monkeypatch.setattr(step, "round_params", lambda p, seed: traced.append(1) or real(p, seed))
    # The RL driver's executables outlive a run: trace this one's afresh.
    monkeypatch.setattr(programs, "_EXECUTABLES", collections.OrderedDict())
    _run(tiny, tmp_path, {**SUPERVISED, **RL}[name], dtype, extra)
    assert bool(traced) == rounds


@pytest.mark.parametrize("name", ["sft", "sft_lora"])
def test_param_dtype_bfloat16_trains(tiny, tmp_path, name):
    """model.param_dtype=bfloat16 (bf16 weights and Adam moments) trains instead of failing in
    the step's non-finite guard (a lax.cond whose branches disagreed on the moments' dtype)."""
    rows = _run(tiny, tmp_path, SUPERVISED[name], "float32", ["model.param_dtype=bfloat16"])
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == STEPS and np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_param_dtype_bfloat16_rl(tiny, tmp_path):
    rows = _run(tiny, tmp_path, RL["ppo"], "bfloat16", ["model.param_dtype=bfloat16"])
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)


def _dots(hlo: str) -> list[tuple[str, str]]:
    """(operand dtype, where) of every dot in a compiled program: 'fast' inside a YNNPACK
    fusion, 'other' elsewhere."""
    fast_comps = set(re.findall(r'calls=(%[\w.\-]+), [^\n]*"__ynn_fusion"', hlo))
    out = []
    for comp in re.split(r"\n(?=\S)", hlo):
        name = comp.split(" ", 1)[0]
        types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", comp))
        for lhs in re.findall(r"= \w+\[[^\]]*\]\{[^}]*\} dot\(%([\w.\-]+),", comp):
            out.append((types.get(lhs, "?"), "fast" if name in fast_comps else "other"))
    return out


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU backend's bf16 dot forms")
@pytest.mark.parametrize("tied,lora_rank", [(True, 0), (False, 0), (True, 8)])
def test_bf16_train_step_dots_all_run_in_bf16(tied, lora_rank):
    """Every dot of a bf16 SFT step (scanned layers with remat, the chunked LM head and its
    custom backward, the attention's custom backward; with LoRA, the adapters' products and
    their gradients, the frozen weights' only the input gradients) compiles to a bf16 x bf16 ->
    fp32 dot in a YNNPACK fusion: none upcast to fp32 (4-7x slower), none left where the
    runtime refuses it. Fails if a transposed operand or a token-contracting weight gradient
    creeps back in."""
    from jaxalign.losses.xent import head_masked_xent
    from jaxalign.models import functional, lora
    from jaxalign.precision import round_params

    cfg = ModelConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=tied,
                      dtype="bfloat16", scan_layers=True, remat="attn", lora_rank=lora_rank,
                      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"))
    params = functional.init_params(cfg)
    B, T = 4, 192
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, cfg.vocab_size)

    def loss(trained, frozen):
        params = lora.combine(trained, frozen)
        _, hidden, _ = functional.apply(cfg, params, tokens, return_logits=False)
        head, head_is_VD = functional.lm_head(cfg, params)
        return head_masked_xent(hidden, head, tokens, jnp.ones((B, T)), head_is_VD=head_is_VD,
                                chunk=64)[0]

    device = jax.devices()[0]
    # A LoRA step differentiates the adapters only (the base weights are frozen).
    trained, frozen = lora.split(params) if lora_rank else (params, {})
    trained, frozen = jax.device_put((trained, frozen), device)
    # As the train step reads them: stochastically rounded (`train.stochastic_rounding`), the
    # gradient taken at the rounded values.
    step = lambda t, f: jax.grad(loss)(round_params(t, jnp.uint32(1)), f)
    hlo = jax.jit(step).lower(trained, frozen).compile().as_text()
    dots = _dots(hlo)
    assert len(dots) >= 20, dots
    assert all(d == ("bf16", "fast") for d in dots), sorted(set(dots))
