"""The CLI's own performance settings (jaxalign/runtime.py): the allocator it preloads, the
persistent compilation cache, and no recompilation after warm-up, within a run, across a
resume and across a second run of the same shapes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxalign import runtime

from conftest import child_xla_flags

ROOT = Path(__file__).resolve().parents[1]


def test_allocator_env_choices(monkeypatch):
    lib = runtime.mimalloc_path()
    if lib is None:
        pytest.skip("cmeel-mimalloc is not installed on this platform")
    env = runtime.allocator_env({"PATH": "/bin"})
    assert env["LD_PRELOAD"] == str(lib)
    assert env["MIMALLOC_PURGE_DELAY"] == runtime.MIMALLOC_ENV["MIMALLOC_PURGE_DELAY"]
    # The user's own choices win: opting out, a preload of their own, an explicit purge delay.
    assert runtime.allocator_env({"JAXALIGN_ALLOCATOR": "system"}) is None
    assert runtime.allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) is None
    assert runtime.allocator_env({"MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"
    # Re-executed once only.
    assert runtime.allocator_env(env) is None
    with pytest.raises(SystemExit, match="JAXALIGN_ALLOCATOR='tcmalloc'"):
        runtime.allocator_env({"JAXALIGN_ALLOCATOR": "tcmalloc"})


_KEEP_AND_RELEASE = """
import time, numpy as np
from jaxalign import runtime

def faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

big = lambda: [np.ones(32 << 20 >> 3) for _ in range(24)]     # 24 x 32 MiB
held = big(); del held
f0 = faults(); held = big(); steady = faults() - f0; del held
time.sleep(0.5)                      # idle past mimalloc's own default purge delay (10 x 10 ms),
for _ in range(3):                   # then the small allocations that would trigger a purge
    small = [np.ones(512) for _ in range(2000)]; del small
f0 = faults(); held = big(); idle = faults() - f0; del held
released = runtime.release_free_memory()
f0 = faults(); held = big(); after_release = faults() - f0
del held
# One block over mimalloc's default arena object limit (2 GiB), as a large step's temporaries:
huge = np.ones(2300 << 20 >> 3); del huge
f0 = faults(); huge = np.ones(2300 << 20 >> 3); huge_reuse = faults() - f0; del huge
print(steady, idle, after_release, released, huge_reuse)
"""


def test_allocator_keeps_pages_within_a_phase_and_releases_them_after():
    """Under the CLI's allocator settings, freed buffers are reused without page faults (the
    reason for preloading mimalloc), and `release_free_memory` hands them back (a pipeline
    stage's or a rollout's high-water mark is not kept under the next phase)."""
    mine = ("MIMALLOC_", "LD_PRELOAD", "JAXALIGN_ALLOC")
    env = runtime.allocator_env({k: v for k, v in os.environ.items() if not k.startswith(mine)})
    if env is None:
        pytest.skip("cmeel-mimalloc is not installed on this platform")
    out = subprocess.run([sys.executable, "-c", _KEEP_AND_RELEASE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    steady, idle, after_release, huge_reuse = (int(x) for x in (out[0], out[1], out[2], out[4]))
    released = float(out[3])
    # 768 MiB is 384 faults in transparent huge pages, ~196k in 4 KiB pages. mimalloc's own
    # defaults purge what was idle (~380 faults on the idle round); purge delay -1 never
    # releases (0 GiB): both fail here.
    assert steady < 20 and idle < 20, out
    assert released > 0.6, out            # GiB, of the 0.75 freed
    assert after_release > 100, out
    # A 2.25 GiB block is reused too (the arena object limit raised): with mimalloc's default
    # limit it is mapped and unmapped each time, ~1,150 huge-page faults.
    assert huge_reuse < 20, out


def test_training_layout_by_backend_and_dtype():
    """The layer form and remat a run gets when model.scan_layers / model.remat are unset: on
    CPU scanned with remat "attn", and in bf16 rows of up to 512 tokens unrolled without remat
    (measured: docs/bench/2026-12-07_cpu_layout_ab.txt, 2026-12-07_cpu_sft_row_length.txt);
    a remat set alone runs scanned, the form in which it lowers the peak; a layout set is the
    layout run, whatever the row length."""
    from jaxalign.config import ModelSource
    assert runtime.train_layout("float32", "cpu") == (True, "attn", 0)
    assert runtime.train_layout("bfloat16", "cpu") == (True, "attn", 512)
    assert runtime.train_layout("bfloat16", "gpu") == (False, "none", 0)
    assert runtime.train_layout("bfloat16", "tpu") == (True, "full", 0)   # not measured: safe

    def layout(**kw):
        rt = ModelSource(path="unused", **kw).runtime()
        return rt["scan_layers"], rt["remat"], rt["unroll_up_to"]
    assert layout(dtype="float32") == (True, "attn", 0)
    assert layout(dtype="bfloat16") == (True, "attn", 512)
    assert layout(dtype="bfloat16", remat="full") == (True, "full", 0)
    assert layout(dtype="bfloat16", remat="none") == (True, "none", 0)
    assert layout(dtype="bfloat16", scan_layers=False) == (False, "attn", 0)
    assert layout(dtype="bfloat16", remat="full", scan_layers=False) == (False, "full", 0)


def test_settle_pause_only_for_large_temporaries():
    """`settle_seconds`: a compiled program whose temporaries reach SETTLE_MIN_BYTES gets
    the pause, a small one none (compiled only, not run)."""
    import jax
    import jax.numpy as jnp
    # An (8192, 8192) fp32 product, sorted (so that it is materialised): 256 MiB.
    x = jax.ShapeDtypeStruct((8192, 64), jnp.float32)
    big = jax.jit(lambda a: jnp.sum(jnp.sort(a @ a.T, axis=1), 0)).lower(x).compile()
    small = jax.jit(lambda a: jnp.sum(jnp.sort(a[:64] @ a[:64].T, axis=1), 0)).lower(x).compile()
    assert big.memory_analysis().temp_size_in_bytes >= runtime.SETTLE_MIN_BYTES
    assert runtime.settle_seconds(big) == runtime.SETTLE_S > 0
    assert runtime.settle_seconds(small) == 0.0


def test_compile_cache_dir_choices(tmp_path):
    assert runtime.compile_cache_dir({"JAXALIGN_COMPILE_CACHE": "off"}) is None
    assert runtime.compile_cache_dir({"JAXALIGN_COMPILE_CACHE": str(tmp_path)}) == tmp_path
    assert runtime.compile_cache_dir({}) == runtime.cache_root() / "xla"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_tiny_model import make_tiny_model
    root = tmp_path_factory.mktemp("runtime")
    model_dir = make_tiny_model(root / "model")
    data = root / "train.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            f.write(json.dumps({"prompt": f"What is {i % 9} plus {i % 7}?",
                                "completion": f"The answer is {i % 9 + i % 7}."}) + "\n")
    return model_dir, data


def _sft(tiny, out_dir, cache_dir, *extra, xla_flags=""):
    model_dir, data = tiny
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JAXALIGN_ALLOCATOR",
                                                             "JAXALIGN_ALLOCATOR_PRELOADED")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {xla_flags}".strip(),
               JAXALIGN_COMPILE_CACHE=str(cache_dir))
    cmd = [sys.executable, "-m", "jaxalign.cli", "-v", "sft", str(ROOT / "configs" / "tiny_sft.yaml"),
           f"out_dir={out_dir}", f"model.path={model_dir}", f"data.train=[{{path: {data}}}]",
           "train.steps=6", "train.save_every=3", "train.tensorboard=false",
           "train.progress=false", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    perf = [json.loads(line) for line in (Path(out_dir) / "perf.jsonl").read_text().splitlines()]
    return proc.stderr, {p["step"]: p for p in perf}


@pytest.mark.slow  # CLI runs in subprocesses
def test_cli_settings_cache_and_no_recompilation(tiny, tmp_path):
    cache = tmp_path / "xla"
    err, perf = _sft(tiny, tmp_path / "a", cache)
    # The CLI re-executed itself under the preloaded allocator and switched the cache on.
    expected = "mimalloc" if runtime.mimalloc_path() is not None else "system"
    assert f"'allocator': '{expected}'" in err
    assert f"'compile_cache': '{cache / runtime.host_key()}'" in err
    # ... and trains with the CPU's measured remat default (docs/bench/README.md); the tiny
    # config sets model.scan_layers itself, which wins over the default.
    assert "training layout: unrolled layers, remat attn" in err
    assert any(cache.iterdir())
    # Every program is compiled by the end of step 1; later steps compile nothing.
    assert perf[1]["compiles"] > 0 and perf[1]["cache_misses"] > 0
    assert all(perf[s]["compiles"] == perf[1]["compiles"] for s in range(2, 6)), perf
    # (step 6 also evaluates and exports nothing new: the run has no eval data.)
    assert perf[6]["compiles"] == perf[1]["compiles"], perf

    # The same command in a fresh directory: every program comes from the cache.
    _, again = _sft(tiny, tmp_path / "b", cache)
    assert again[1]["cache_misses"] == 0 and again[1]["cache_hits"] > 0, again[1]
    assert again[6]["compiles"] == again[1]["compiles"]

    # A resume (checkpoint at step 3, the later one removed): cache hits only, and no
    # recompilation after the first resumed step.
    run = tmp_path / "a"
    shutil.rmtree(run / "checkpoints" / "6")
    err, resumed = _sft(tiny, run, cache)
    assert "resumed" in err
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # perf.jsonl cut back to step 3, then 4..6
    assert resumed[4]["cache_misses"] == 0 and resumed[4]["cache_hits"] > 0, resumed[4]
    assert resumed[6]["compiles"] == resumed[4]["compiles"]


@pytest.mark.slow  # CLI runs in subprocesses
def test_the_suites_codegen_level_moves_results_by_round_off_only(tiny, tmp_path):
    """conftest compiles the suite with LLVM's optimizer off; the same CLI run compiled that
    way and as users get it (XLA's default level) trains to the same losses and gradient norms
    within fp32 round-off."""
    runs = {}
    for level in ("0", None):
        flags = f"--xla_backend_optimization_level={level}" if level else ""
        _, perf = _sft(tiny, tmp_path / f"level_{level}", tmp_path / "xla", "train.save_every=0",
                       xla_flags=flags)
        rows = [json.loads(l) for l in (tmp_path / f"level_{level}" / "metrics.jsonl")
                .read_text().splitlines()]
        runs[level] = {k: [r[k] for r in rows] for k in ("loss", "grad_norm")}
    # The second run shares the first's compilation cache, whose keys cover XLA_FLAGS: it
    # compiled its own programs, so the level reached XLA.
    assert perf[1]["cache_misses"] > 0, perf[1]
    assert len(runs[None]["loss"]) == 6
    for key, want in runs[None].items():
        np.testing.assert_allclose(runs["0"][key], want, rtol=1e-5, err_msg=key)


def test_cache_off_and_system_allocator(tiny, tmp_path):
    model_dir, data = tiny
    env = dict(os.environ, JAXALIGN_ALLOCATOR="system", JAXALIGN_COMPILE_CACHE="off",
               XLA_FLAGS=child_xla_flags("--xla_force_host_platform_device_count=1"))
    env.pop("LD_PRELOAD", None)
    proc = subprocess.run([sys.executable, "-m", "jaxalign.cli", "-v", "generate", str(model_dir),
                           "--prompt", "What is 2 plus 3?", "--max-new-tokens", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'allocator': 'system', 'compile_cache': 'off'" in proc.stderr


def test_compile_cache_is_kept_per_host_kind():
    """Programs compiled for one CPU never load on another: the cache folder names the CPU
    model and instruction-set flags (and jaxlib), not the order the flags are listed in."""
    amx = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\nflags\t\t: sse avx512f amx_bf16\n"
    epyc = "processor\t: 0\nmodel name\t: AMD EPYC 9654\nflags\t\t: sse avx512f avx512_bf16\n"
    reordered = amx.replace("sse avx512f amx_bf16", "amx_bf16 sse avx512f")
    second_cpu = amx + "\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: sse\n"
    assert runtime.host_key(amx) != runtime.host_key(epyc)
    assert runtime.host_key(amx) == runtime.host_key(reordered) == runtime.host_key(second_cpu)
    assert runtime.host_key(amx) != runtime.host_key(amx.replace(" amx_bf16", ""))
    assert runtime.host_key().startswith("jaxlib")


@pytest.mark.parametrize("choice", ["mimalloc", "system"])
def test_measuring_scripts_run_under_the_clis_allocator(choice):
    """scripts/attention_bench.py (and profile_step.py, the same call) re-executes itself under
    the allocator the CLI preloads, so that what it times is what `jaxalign` runs: under glibc
    the attention layer took 25.7 against 14.3 ms (its temporaries page-faulted afresh on every
    call). JAXALIGN_ALLOCATOR=system keeps glibc, as for the CLI."""
    mine = ("MIMALLOC_", "LD_PRELOAD", "JAXALIGN_ALLOC")
    env = {k: v for k, v in os.environ.items() if not k.startswith(mine)}
    if runtime.allocator_env(env) is None:
        pytest.skip("cmeel-mimalloc is not installed on this platform")
    env[runtime.ALLOCATOR_ENV] = choice
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "attention_bench.py"),
                          "--batch", "1", "--seq", "32", "--repeat", "1"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert f"allocator {choice}" in out.splitlines()[0], out
