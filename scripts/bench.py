"""One benchmark command: jaxalign (`ours`) against PyTorch / TRL (`theirs`) on one workload.

  python scripts/bench.py WORKLOAD [--model HF_DIR] [--steps 3] [--warmup 1] [--batch B]
                          [--seq T] [--precision bf16|fp32] [--side ours|theirs|both]
                          [--allocator default[,system,jemalloc,mimalloc]] [--theirs-gc default,off]
                          [--out FILE]

WORKLOAD: forward, generate, sft, sft-lora, dpo, rm, ppo, grpo (see WORKLOADS below).
Every row runs in a fresh child process, one after the other: ours as the user runs it (the
CLI `python -m jaxalign.cli sft|rm|dpo|ppo config.yaml` for training, the public Python API
for forward / generate), theirs = transformers / TRL 1.16 with their defaults except what
must match. Same model, token ids, shapes and precision on both sides (bf16 by default:
TRL's own default, bf16=True autocast; --precision fp32 for the fp32 rows). A train workload
without --allocator / --theirs-gc runs two baselines (BASELINES): TRL as a user gets it (its
defaults, gradient checkpointing on, glibc) and best TRL on this machine (gradient
checkpointing on and off, both with the mimalloc our CLI preloads; the faster one counts);
ours is compared with both. A probe child first
measures this machine's matmul peak and memory bandwidth (MFU and roofline denominators).
Prints one table and ends with one JSON line; methodology: docs/bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import common, data  # noqa: E402  (scripts/bench/: the helpers)

NO_TRL_PPO = "TRL 1.16 has no PPO trainer (trl.PPOTrainer, trl.experimental.ppo): ours only"


@dataclasses.dataclass(frozen=True)
class Workload:
    kind: str                      # train (CLI) | infer (python API)
    defaults: dict                 # flag defaults of this workload (the targets)
    unit: str                      # what the speed column counts per second
    theirs: str | None             # theirs.FUNCTION, None: ours only
    flops_per_token: Callable[[dict], float] | None = None   # model FLOPs of one token (MFU)
    note: str = ""


def _dims(m: dict) -> dict:
    """Llama sizes from config.json; N_mm = weights multiplied per token (the tied embedding
    counts once, as the LM head; an untied input embedding is a lookup); attn = L * H * hd."""
    D, I, L, V = m["hidden_size"], m["intermediate_size"], m["num_hidden_layers"], m["vocab_size"]
    H, KV = m["num_attention_heads"], m.get("num_key_value_heads", m["num_attention_heads"])
    hd = m.get("head_dim") or D // H
    layer = D * H * hd * 2 + D * KV * hd * 2 + 3 * D * I
    head = V * D
    untied = not m.get("tie_word_embeddings", False)
    return dict(params=L * (layer + 2 * D) + D + head * (1 + untied), n_mm=L * layer + head,
                n_body=L * layer, attn=L * H * hd)


# FLOPs per token (PaLM appendix B): 2 N_mm forward, 6 N_mm train (fwd + bwd), plus attention
# scores and values 4 * attn * T forward (full T x T, as both sides compute), 12 * attn * T train.
def _fwd(d, T): return 2 * d["n_mm"] + 4 * d["attn"] * T
def _train(d, T): return 6 * d["n_mm"] + 12 * d["attn"] * T


WORKLOADS = {
    "forward": Workload("infer", dict(batch="8", seq=256), "tok/s", "forward",
                        lambda c: _fwd(c["dims"], c["seq"])),
    "generate": Workload("infer", dict(batch="8,1", prompt_tokens=32, new_tokens=128), "new tok/s", "generate"),
    "sft": Workload("train", dict(batch="8", seq=256), "tok/s", "sft", lambda c: _train(c["dims"], c["seq"])),
    # LoRA: no gradients of the frozen weights: 4 N_mm instead of 6.
    "sft-lora": Workload("train", dict(batch="8", seq=256), "tok/s", "sft",
                         lambda c: 4 * c["dims"]["n_mm"] + 12 * c["dims"]["attn"] * c["seq"]),
    # DPO: policy trained (6) + the frozen reference forward (2), over chosen and rejected.
    "dpo": Workload("train", dict(batch="4", prompt_len=128, response_len=128), "pairs/s", "dpo",
                    lambda c: _train(c["dims"], c["seq"]) + _fwd(c["dims"], c["seq"])),
    # Reward model: the body only (the score head is one row, no LM head).
    "rm": Workload("train", dict(batch="4", prompt_len=128, response_len=128), "pairs/s", "rm",
                   lambda c: 6 * c["dims"]["n_body"] + 12 * c["dims"]["attn"] * c["seq"]),
    "ppo": Workload("train", dict(batch="2", generations=4, new_tokens=64), "resp tok/s", None, note=NO_TRL_PPO),
    "grpo": Workload("train", dict(batch="2", generations=4, new_tokens=64), "resp tok/s", "grpo"),
}
FLAG_DEFAULTS = dict(seq=256, prompt_len=128, response_len=128, prompt_tokens=32, new_tokens=128,
                     generations=4)
GRPO_EPOCHS = 4      # ours' default ppo.epochs (one minibatch): TRL's num_iterations is set to it
GRPO_BETA = 0.04     # ours' default grpo.beta; TRL's default 0 would skip the reference model

# The rows of a train workload when neither --allocator nor --theirs-gc is given:
# (side, TRL gradient checkpointing, allocator, baseline). "default": TRL 1.16 as a user runs it
# (bf16 autocast at --precision bf16, gradient checkpointing on, glibc). "best": the same trainer
# with the allocator our CLI preloads (mimalloc, jaxalign/runtime.py) preloaded for it too, with
# gradient checkpointing on and off; the faster of the two is "best TRL". torch.compile is left
# out: not tried on this CPU setup yet, so no claim is made about it.
BASELINES = (("ours", None, "default", None), ("theirs", "default", "default", "default"),
             ("theirs", "default", "mimalloc", "best"), ("theirs", "off", "mimalloc", "best"))


# ----------------------------------------------------------------------------- rows

def _model_dir(args) -> str:
    if args.model:
        return str(Path(args.model).expanduser().resolve())
    from fetch_smollm2 import fetch  # scripts/: the cached SmolLM2-135M-Instruct
    return str(fetch())


_ROW_IDS = itertools.count()


def _worker_row(job: dict, env: dict, tmp: Path, label: str, verbose: bool) -> dict:
    path = tmp / f"job-{next(_ROW_IDS)}.json"
    path.write_text(json.dumps(job))
    r = common.run_child(common.worker_argv(str(path)), env, label=label, verbose=verbose)
    out = common.last_json(r["stdout"]) if r["rc"] == 0 else {"error": f"exit {r['rc']}"}
    return dict(out, peak_rss_gib=r["peak_rss_gib"], smi_dev_gib=r["smi_dev_gib"], wall_s=r["wall_s"])


def _ours_train(ctx: dict, env: dict, label: str) -> dict:
    from bench import ours
    run_dir = ctx["tmp"] / f"run-{next(_ROW_IDS)}"
    if not ctx["args"].warm_cache:  # a cold start: the compile time a first run pays
        env = dict(env, JAXALIGN_COMPILE_CACHE=str(run_dir.parent / f"{run_dir.name}-xla"))
    r = common.run_child(ours.cli_argv(ctx["command"], ctx["raw"], run_dir, ctx["args"].ours_set), env, label=label,
                         verbose=ctx["verbose"])
    measured = dict(peak_rss_gib=r["peak_rss_gib"], smi_dev_gib=r["smi_dev_gib"], wall_s=r["wall_s"])
    if r["rc"] != 0:
        return dict(error=f"exit {r['rc']}", **measured)
    # peak_dev_gib (the allocator's own peak): the CLI does not write it; nvidia-smi's figure stands.
    res = ours.read_run(run_dir, ctx["warmup"], rl=ctx["workload"] in ("ppo", "grpo"))
    if not ctx["verbose"]:
        shutil.rmtree(run_dir)  # its checkpoint: optimizer state and weights
    return dict(res, peak_dev_gib=None, **measured)


def _theirs_job(ctx: dict, variant: dict, gc: str) -> dict:
    w, a = ctx["workload"], ctx["args"]
    job = dict(fn=f"theirs.{WORKLOADS[w].theirs}", model=ctx["model"], precision=a.precision, gc=gc,
               warmup=a.warmup, steps=a.steps, batch=variant["batch"], seq=ctx["seq"])
    if WORKLOADS[w].kind == "infer":
        job.update(tokens=variant["tokens"], new_tokens=a.new_tokens)
    elif w in ("sft", "sft-lora"):
        job.update(rows=ctx["prep"]["rows"], lr=ctx["raw"]["optim"]["lr"], lora=w == "sft-lora")
    elif w in ("dpo", "rm"):
        job.update(pairs=ctx["prep"]["pairs"], lr=ctx["raw"]["optim"]["lr"])
    elif w == "grpo":
        job.update(prompts=ctx["prompts"], generations=a.generations, new_tokens=a.new_tokens,
                   epochs=GRPO_EPOCHS, beta=GRPO_BETA, lr=ctx["raw"]["optim"]["lr"])
    return job


def _prepare(ctx: dict, args) -> list[dict]:
    """Writes the data / config of the workload; returns its variants (generate: per batch)."""
    import numpy as np
    w = ctx["workload"]
    batches = [int(b) for b in str(args.batch).split(",")]
    if WORKLOADS[w].kind == "infer":
        length = args.seq if w == "forward" else args.prompt_tokens
        rng = np.random.default_rng(0)  # ids from 3 up: no special token (SmolLM2's are 0-2)
        return [dict(batch=b, tokens=rng.integers(3, ctx["config"]["vocab_size"], (b, length)).tolist())
                for b in batches]
    if len(batches) != 1:
        sys.exit(f"{w}: --batch takes one number")
    args.batch = batches[0]
    ctx["command"], ctx["raw"] = data.cli_config(w, args, ctx["model"], ctx["tmp"])
    n = args.warmup + args.steps
    if w in ("sft", "sft-lora", "dpo", "rm") and args.side != "ours":
        # The CLI's own batches, built in a child of their own (jax stays out of TRL's RSS).
        job = dict(fn="prep", command=ctx["command"], raw=ctx["raw"], n=n, out=str(ctx["tmp"] / "prep.json"))
        r = _worker_row(job, common.child_env("default"), ctx["tmp"], f"{w} data (jaxalign pipeline)", args.verbose)
        if "error" in r:
            sys.exit(f"{w}: building the CLI's batches failed")
        ctx["prep"] = json.loads((ctx["tmp"] / "prep.json").read_text())
    if w == "grpo":
        lines = Path(ctx["raw"]["data"]["prompts"]).read_text().splitlines()
        ctx["prompts"] = [json.loads(l)["messages"][0]["content"] for l in lines][:n * args.batch]
    return [dict(batch=args.batch)]


def _speed(ctx: dict, v: dict, r: dict) -> float | None:
    a, w = ctx["args"], ctx["workload"]
    if "step_s" not in r:
        return None
    per_step = {"forward": v["batch"] * ctx["seq"], "generate": v["batch"] * a.new_tokens,
                "dpo": v["batch"], "rm": v["batch"]}.get(w, v["batch"] * ctx["seq"])
    if w in ("ppo", "grpo"):  # rows = prompts x generations (ppo: that many prompts, one each)
        per_step = v["batch"] * a.generations * (r.get("response_length") or 0)
    return per_step / r["step_s"]


def _derived(ctx: dict, v: dict, r: dict) -> dict:
    """MFU and roofline of a row against the probe's figures."""
    wl, probe, a = WORKLOADS[ctx["workload"]], ctx["probe"], ctx["args"]
    out = {"speed": _speed(ctx, v, r)}
    if "step_s" not in r:
        return out
    peak = probe.get(f"matmul_{a.precision}_flops")
    tokens = v["batch"] * ctx["seq"] * (2 if ctx["workload"] in ("dpo", "rm") else 1)
    if r.get("tokens_per_step") not in (None, tokens) and ctx["workload"] not in ("ppo", "grpo"):
        out["warning"] = f"the CLI trained {r['tokens_per_step']:.0f} tokens a step, not {tokens}"
    if wl.flops_per_token and peak:
        out["model_flops_per_s"] = wl.flops_per_token(ctx) * tokens / r["step_s"]
        out["mfu"] = out["model_flops_per_s"] / peak
    if ctx["workload"] == "generate" and probe.get("mem_read_bytes_per_s"):
        # Weights read once per decode step; step = call time / new tokens (prefill included).
        weight_bytes = r.get("param_bytes") or 4 * ctx["dims"]["params"]  # fp32 params on both sides
        out["weight_read_bytes_per_s"] = weight_bytes * a.new_tokens / r["step_s"]
        out["roofline"] = out["weight_read_bytes_per_s"] / probe["mem_read_bytes_per_s"]
    return out


def _settings(row: dict, args) -> str:
    """The exact settings of a row, printed in its table line."""
    alloc = {"default": "mimalloc (the CLI's own)" if row["side"] == "ours" else "glibc",
             "system": "glibc"}.get(row["allocator"], f"{row['allocator']} preloaded")
    if row["side"] == "ours":
        dtype = "model.dtype=bfloat16 (fp32 master weights)" if args.precision == "bf16" else "fp32"
        return f"jaxalign CLI, {dtype}, {alloc}"
    prec = "bf16=True autocast" if args.precision == "bf16" else "bf16=False (fp32)"
    gc = "gradient checkpointing off" if row.get("gc") == "off" else "gradient checkpointing on (default)"
    return f"TRL 1.16, {prec}, {gc}, {alloc}"


def _compare_baselines(rows: list[dict]) -> None:
    """ours against TRL's default row and against the best TRL row (BASELINES)."""
    ours = next((r for r in rows if r["side"] == "ours" and r.get("step_s")), None)
    default = next((r for r in rows if r.get("baseline") == "default" and r.get("step_s")), None)
    best = min((r for r in rows if r.get("baseline") == "best" and r.get("step_s")),
               key=lambda r: r["step_s"], default=None)
    if ours is None:
        return
    if best is not None:
        best["best"] = True
        ours["ratio_best"] = best["step_s"] / ours["step_s"]
        ours["best_variant"] = best["settings"]
    if default is not None:
        ours["ratio"] = ours["ratio_default"] = default["step_s"] / ours["step_s"]
    ours["ratios"] = {r["settings"]: r["step_s"] / ours["step_s"]
                      for r in rows if r["side"] == "theirs" and r.get("step_s")}


def _compare(rows: list[dict], workload: str) -> None:
    """Ours against theirs, same allocator and batch: speed ratios (`ratio`: theirs' first,
    default row) and whether forward / generate computed the same thing."""
    for row in (r for r in rows if r["side"] == "ours" and r.get("step_s")):
        others = [o for o in rows if o["side"] == "theirs" and o["allocator"] == row["allocator"]
                  and o["batch"] == row["batch"] and o.get("step_s")]
        if not others:
            continue
        row["ratios"] = {o["variant"]: o["step_s"] / row["step_s"] for o in others}
        row["ratio"] = others[0]["step_s"] / row["step_s"]
        mine, theirs = row.get("check"), others[0].get("check")
        if mine and theirs and workload == "forward":
            row["agreement"] = f"logits max |diff| {max(abs(x - y) for x, y in zip(mine, theirs)):.2g}"
        elif mine and theirs:
            same = next((i for i, (x, y) in enumerate(zip(mine, theirs)) if x != y), len(mine))
            row["agreement"] = f"first {same}/{len(mine)} tokens of row 0 equal"


# ----------------------------------------------------------------------------- driver

def _plan(args, wl: Workload) -> list[tuple]:
    """(side, gc, allocator, baseline) of every row, in the order they run."""
    sides = ["ours", "theirs"] if args.side == "both" else [args.side]
    if wl.kind == "train" and wl.theirs and args.allocator is None and args.theirs_gc is None:
        return [b for b in BASELINES if b[0] in sides]
    plan = []
    for alloc in (args.allocator or "default").split(","):
        if "ours" in sides:
            plan.append(("ours", None, alloc, None))
        if "theirs" in sides:
            plan += [("theirs", gc, alloc, None) for gc in (args.theirs_gc or "default").split(",")]
    return plan


def run(args) -> list[dict]:
    wl = WORKLOADS[args.workload]
    model = _model_dir(args)
    config = json.loads((Path(model) / "config.json").read_text())
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{args.workload}-"))
    if args.workload in ("dpo", "rm"):
        args.seq = args.prompt_len + args.response_len
    seq = args.seq
    ctx = dict(workload=args.workload, args=args, model=model, config=config, dims=_dims(config), tmp=tmp,
               seq=seq, warmup=args.warmup, verbose=args.verbose)
    ctx["probe"] = _worker_row(dict(fn="probe.probe"), common.child_env("default"), tmp, "machine probe", args.verbose)
    variants = _prepare(ctx, args)
    plan = _plan(args, wl)
    rows = []
    for side, gc, alloc, baseline in plan:
        env = common.child_env(alloc)
        for v in variants:
            name = side if gc in (None, "default") else f"{side} gc {gc}"
            label = f"{args.workload} {name} batch {v['batch']} allocator {alloc}"
            row = dict(side=side, variant=name, allocator=alloc, batch=v["batch"], gc=gc,
                       baseline=baseline)
            row["settings"] = _settings(row, args)
            if env is None:
                r = {"error": f"{alloc} not installed"}
            elif side == "theirs" and wl.theirs is None:
                r = {"error": "no TRL trainer"}
            elif side == "ours" and wl.kind == "train":
                r = _ours_train(ctx, env, label)
            elif side == "ours":
                job = dict(fn=f"ours.{args.workload}", model=model, precision=args.precision, tokens=v["tokens"],
                           warmup=args.warmup, steps=args.steps, new_tokens=args.new_tokens)
                r = _worker_row(job, env, tmp, label, args.verbose)
            else:
                r = _worker_row(_theirs_job(ctx, v, gc), env, tmp, label, args.verbose)
            row.update(r)
            row.update(_derived(ctx, v, r))
            rows.append(row)
    if any(r["baseline"] for r in rows):
        _compare_baselines(rows)
    else:
        _compare(rows, args.workload)
    ctx["rows"] = rows
    if not args.verbose:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(ctx)


def report(ctx: dict) -> list[dict]:
    a, wl, probe = ctx["args"], WORKLOADS[ctx["workload"]], ctx["probe"]
    header = ["side", "alloc", "batch", "step s", wl.unit, "ours/theirs", "peak RSS GiB", "dev alloc GiB", "dev smi GiB",
              "compile s", "first step s", "MFU %", "roofline %", "loss@1", "settings / note"]
    table = []
    for r in ctx["rows"]:
        pct = lambda k: 100 * r[k] if r.get(k) is not None else None  # noqa: E731
        note = r.get("error") or r.get("warning") or r.get("agreement", "")
        if r.get("logprob_gap_vs_fp32"):   # generate in bf16: the sampler's log-probs vs fp32's
            g = r["logprob_gap_vs_fp32"]
            note = "; ".join([note] * bool(note) + [f"log-prob gap vs fp32 max {g['max']:.2g} mean {g['mean']:.2g}"])
        if r.get("ratio_best") is not None or r.get("ratio_default") is not None:
            note = "; ".join([note] * bool(note) + [
                f"{x:.3g}x TRL default" if k == "ratio_default" else f"{x:.3g}x best TRL"
                for k in ("ratio_default", "ratio_best") if (x := r.get(k)) is not None])
        elif len(r.get("ratios", {})) > 1:
            note = "; ".join([note] * bool(note) + [f"vs {k}: {x:.3g}x" for k, x in r["ratios"].items()])
        if r.get("settings"):
            note = "; ".join([r["settings"] + (" [best TRL]" if r.get("best") else "")] + [note] * bool(note))
        if ctx["workload"] in ("ppo", "grpo") and r.get("rollout_s") is not None:
            note = f"rollout {r['rollout_s']:.3g} s, resp len {r.get('response_length') or 0:.1f}"
        table.append([r["variant"], r["allocator"], r["batch"], r.get("step_s"), r.get("speed"), r.get("ratio"),
                      r.get("peak_rss_gib"), r.get("peak_dev_gib"), r.get("smi_dev_gib"), r.get("compile_s"),
                      r.get("first_step_s"),
                      pct("mfu"), pct("roofline"), r.get("loss1"), note])
    w = ctx["workload"]
    shape = {"generate": f"batch x ({a.prompt_tokens}-token prompt + {a.new_tokens} new tokens)",
             "grpo": f"batch prompts x {a.generations} generations, {a.new_tokens} new tokens each "
                     f"(EOS banned until then on both sides)",
             "ppo": f"batch x {a.generations} prompts, {a.new_tokens} new tokens each (EOS banned "
                    f"until then)",
             "dpo": f"batch pairs x 2 x ({a.prompt_len} + {a.response_len}) tokens",
             "rm": f"batch pairs x 2 x ({a.prompt_len} + {a.response_len}) tokens"}.get(w, f"batch x {ctx['seq']} tokens")
    title = f"{w}: {Path(ctx['model']).name}, {a.precision}, {shape}; median of {a.steps} steps after {a.warmup} warm-up"
    if a.ours_set:
        title += f"; ours with {' '.join(a.ours_set)}"
    lines = [title if not wl.note else f"{title}\n{wl.note}", common.table("", header, table).lstrip("\n")]
    gf = lambda k: probe.get(k, 0) / 1e9  # noqa: E731
    lines.append(f"machine: matmul peak {gf('matmul_fp32_flops'):.1f} GFLOP/s fp32, {gf('matmul_bf16_flops'):.1f} "
                 f"bf16 ({probe.get('matmul_shape')}); memory read {gf('mem_read_bytes_per_s'):.1f} GB/s "
                 f"(numpy copy {gf('numpy_copy_bytes_per_s'):.1f}); backend {probe.get('backend')}")
    machine = dict(common.machine_info(), backend=probe.get("backend"), device=probe.get("device"))
    result = dict(bench="jaxalign", workload=ctx["workload"], model=ctx["model"], dims=ctx["dims"],
                  settings={k: v for k, v in vars(a).items() if k != "worker"}, machine=machine,
                  probe=probe, rows=ctx["rows"], note=wl.note)
    text = "\n".join(lines) + "\n" + json.dumps(result, default=str)
    print(text, flush=True)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return ctx["rows"]


def worker(path: str) -> None:
    """One child row: runs job['fn'] and prints its result as the last stdout line."""
    job = json.loads(Path(path).read_text())
    out, sys.stdout = sys.stdout, sys.stderr  # libraries' prints must not corrupt the result
    if job["fn"] == "prep":
        batches = data.cli_batches(job["command"], job["raw"], job["n"])
        rows = ({"rows": data.sft_rows(batches)} if job["command"] == "sft" else {"pairs": data.pair_rows(batches)})
        Path(job["out"]).write_text(json.dumps(rows))
        result = {"n": len(batches)}
    else:
        import importlib
        module, fn = job["fn"].split(".")
        result = getattr(importlib.import_module(f"bench.{module}"), fn)(job)
    print(json.dumps(result, default=float), file=out, flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS), nargs="?")
    ap.add_argument("--model", help="HF dir (default: the cached SmolLM2-135M-Instruct, scripts/fetch_smollm2.py)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps / calls / iterations (median)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (the first compiles)")
    ap.add_argument("--batch", help="rows (sft, forward), pairs (dpo, rm), prompts (ppo, grpo); "
                                    "generate: a comma list of batch sizes")
    ap.add_argument("--seq", type=int, help="tokens per row (sft, sft-lora, forward)")
    ap.add_argument("--prompt-len", type=int, help="dpo / rm: prompt tokens of every pair")
    ap.add_argument("--response-len", type=int, help="dpo / rm: tokens of each response")
    ap.add_argument("--prompt-tokens", type=int, help="generate: prompt tokens")
    ap.add_argument("--new-tokens", type=int, help="generate / ppo / grpo: new tokens per row")
    ap.add_argument("--generations", type=int, help="grpo: completions per prompt (ppo: rows per prompt batch)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                    help="both sides: bf16 (TRL's default, bf16=True autocast; ours model.dtype="
                         "bfloat16 over fp32 master weights) or fp32")
    ap.add_argument("--side", choices=("ours", "theirs", "both"), default="both")
    ap.add_argument("--warm-cache", action="store_true",
                    help="ours' train rows use the user's compilation cache (a rerun) instead of a "
                         "fresh one per row (a cold first run, the default)")
    ap.add_argument("--allocator", default=None,
                    help="comma list of default (the user's environment: the jaxalign CLI preloads "
                         "its mimalloc, torch runs on glibc), system (glibc on both sides), jemalloc, "
                         "mimalloc (LD_PRELOAD on both sides, when installed). Unset with --theirs-gc "
                         "unset on a train workload: the TRL-default and best-TRL rows (BASELINES)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="train workloads: a CLI override for ours (e.g. model.remat=full), repeatable")
    ap.add_argument("--theirs-gc", default=None,
                    help="comma list of default (TRL's: gradient checkpointing on), off: one theirs row each")
    ap.add_argument("--out", help="also write the table and the JSON line here")
    ap.add_argument("--verbose", action="store_true",
                    help="show the children's stderr and keep the temp dir (configs, data, run dirs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.workload is None:
        ap.error("a workload is required")
    for k, v in {**FLAG_DEFAULTS, **WORKLOADS[args.workload].defaults}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (the first step compiles)")
    bad = [x for x in (args.allocator or "default").split(",")
           if x not in ("default", "system", "jemalloc", "mimalloc")]
    bad += [x for x in (args.theirs_gc or "default").split(",") if x not in ("default", "off")]
    if bad:
        ap.error(f"--allocator / --theirs-gc: unknown {bad}")
    run(args)


if __name__ == "__main__":
    main()
