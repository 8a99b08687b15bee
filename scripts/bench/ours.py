"""jaxalign's side of every workload, as a user gets it.

Train workloads: the real CLI (`python -m jaxalign.cli CMD config.yaml`) in a child process,
read back from the run dir's perf.jsonl / metrics.jsonl. forward / generate: the public Python
API in a `bench.py --worker` child. Peak RSS is measured by the driver for both (wait4)."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import yaml


def cli_argv(command: str, raw: dict, run_dir: Path, overrides: list[str] = ()) -> list[str]:
    """`python -m jaxalign.cli COMMAND config.yaml [key=value ...]`, the config written next
    to the run dir."""
    raw = dict(raw, out_dir=str(run_dir))
    cfg = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return [sys.executable, "-m", "jaxalign.cli", command, str(cfg), *overrides]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def read_run(run_dir: Path, warmup: int, rl: bool) -> dict:
    """Step times from perf.jsonl: the median of the steps after `warmup`. 'compile_s': the
    backend compile time the run itself counted up to its first step (perf.jsonl's cumulative
    `compile_s`, jaxalign/runtime.py), else the first step's time minus that median."""
    perf = _jsonl(run_dir / "perf.jsonl")
    metrics = _jsonl(run_dir / "metrics.jsonl")
    key = "iteration_s" if rl else "step_s"
    times = [p[key] for p in perf]
    if len(times) <= warmup:
        raise RuntimeError(f"{run_dir}: {len(times)} steps in perf.jsonl, more than {warmup} needed")
    step_s = statistics.median(times[warmup:])
    out = dict(step_s=step_s, first_step_s=times[0], steps_logged=len(times),
               compile_s=perf[0].get("compile_s", None if rl else max(times[0] - step_s, 0.0)),
               cache_hits=perf[0].get("cache_hits"),
               tokens_per_step=round(statistics.median(p["tokens_per_s"] * p[key] for p in perf[warmup:]), 3))
    if rl:
        timed = metrics[warmup:]
        out.update(rollout_s=statistics.median(p["rollout_s"] for p in perf[warmup:]),
                   update_s=statistics.median(p["update_s"] for p in perf[warmup:]),
                   response_length=statistics.mean(m.get("response_length", float("nan")) for m in timed))
    if metrics:
        out["loss1"] = metrics[0].get("loss")
    return out


# ----------------------------------------------------------------------------- python API rows

def _device_peak_gib():
    import jax
    d = jax.devices()[0]
    stats = d.memory_stats() if d.platform != "cpu" else None
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def _load(job: dict, scan_layers: bool | None):
    from jaxalign import checkpoint
    runtime = {"dtype": "bfloat16" if job["precision"] == "bf16" else "float32"}
    if scan_layers is not None:
        runtime["scan_layers"] = scan_layers
    cfg, params, _, _ = checkpoint.load_model(job["model"], **runtime)
    return cfg, params


def _timed(fn, warmup: int, steps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:]), times


def forward(job: dict) -> dict:
    """Logits of every position: `functional.apply` jitted, params as `load_model` gives them."""
    import jax
    import numpy as np
    from jaxalign.models import functional

    cfg, params = _load(job, None)
    tokens = np.asarray(job["tokens"], np.int32)
    fwd = jax.jit(lambda p, t: functional.apply(cfg, p, t)[0])
    t0 = time.perf_counter()
    compiled = fwd.lower(params, tokens).compile()
    compile_s = time.perf_counter() - t0
    step_s, times = _timed(lambda: compiled(params, tokens).block_until_ready(), job["warmup"], job["steps"])
    logits = np.asarray(compiled(params, tokens)[0, -1, :8], np.float64)
    return dict(step_s=step_s, first_step_s=times[0], compile_s=compile_s, check=logits.tolist(),
                param_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
                peak_dev_gib=_device_peak_gib(), device=str(jax.devices()[0].device_kind))


def _logprob_gap_vs_fp32(cfg, params, tokens, out) -> dict:
    """How far the sampler's log-probs (decoded in cfg.dtype, e.g. bf16 weights) are from
    the fp32 forward's log-probs of the same sampled tokens: max and mean |diff| (nats)."""
    import jax
    import numpy as np
    from jaxalign.models import functional

    full = np.concatenate([tokens, out["tokens_BN"]], axis=1)
    logits = functional.apply(cfg.replace(dtype="float32"), params, full)[0][:, tokens.shape[1] - 1:-1]
    logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, axis=-1)),
                              out["tokens_BN"][..., None], axis=-1)[..., 0]
    diff = np.abs(logp - out["logprobs_BN"])
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def generate(job: dict) -> dict:
    """Greedy decoding of exactly new_tokens tokens (no EOS ids: it never stops early), layers
    scanned as `jaxalign generate` loads them, through `make_generate_fn`."""
    import jax
    import numpy as np
    from jaxalign.generate import make_generate_fn

    cfg, params = _load(job, True)
    tokens = np.asarray(job["tokens"], np.int32)
    mask = np.ones_like(tokens)
    fn = make_generate_fn(cfg, job["new_tokens"], 0.0, 0, 1.0, (), 0)
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = fn.lower(params, tokens, mask, key).compile()
    compile_s = time.perf_counter() - t0
    out = {}

    def call():
        out.update(jax.device_get(compiled(params, tokens, mask, key)))

    step_s, times = _timed(call, job["warmup"], job["steps"])
    assert (out["lengths_B"] == job["new_tokens"]).all(), out["lengths_B"]
    gap = None
    if cfg.dtype != "float32":
        gap = _logprob_gap_vs_fp32(cfg, params, tokens, out)
    return dict(step_s=step_s, first_step_s=times[0], compile_s=compile_s, check=out["tokens_BN"][0, :16].tolist(),
                logprob_gap_vs_fp32=gap,
                param_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
                peak_dev_gib=_device_peak_gib(), device=str(jax.devices()[0].device_kind))
