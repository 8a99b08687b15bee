"""SFT training speed, jaxalign vs TRL `SFTTrainer`, on SmolLM2-135M, same batches and allocator.

  python scripts/bench_sft.py [--batch 8] [--seq 256] [--steps 3] [--warmup 1] [--modes full,lora]
                              [--precision fp32|bf16] [--allocator jemalloc|glibc]
                              [--ours unrolled/none,unrolled/full,scan/none,scan/full] [--trl-gc on,off]

Every row runs in its own subprocess (same allocator, inherited from this process) so that
its peak RSS is its own. Both sides train on the same synthetic batches: random token ids,
exactly --seq tokens per row, no padding, every next-token prediction trained, in the same
order, with AdamW (same lr, constant schedule, no weight decay), clipping at 1.0.
LoRA: rank 16, alpha 32, on q_proj and v_proj, on both sides. bf16: ours computes in bf16
with fp32 params (fp32 accumulation); TRL uses bf16 autocast (its default) on fp32 params.

Step time is the median over --steps timed steps after --warmup steps. Ours: batch
transfer + the jitted step, blocked on; compile time is `lower().compile()`. TRL: from
`on_step_begin` to `on_step_end` (forward, backward, clip, optimizer). "loss@1" is the
first step's loss on the same batch from the same weights: it must agree across sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib

LR = 1e-5


def synthetic_tokens(vocab: int, n_batches: int, batch: int, seq: int):
    """(n_batches, batch, seq) int32 ids, identical in every subprocess (fixed seed)."""
    import numpy as np
    return np.random.default_rng(0).integers(3, vocab, (n_batches, batch, seq), dtype=np.int32)


# ----------------------------------------------------------------------------- ours

def run_ours(job: dict) -> dict:
    import jax
    import numpy as np

    from jaxalign import sharding
    from jaxalign.config import MeshConfig
    from jaxalign.data import packing
    from jaxalign.train import sft
    from jaxalign.train.loop import batch_sharding, put_batch
    from jaxalign.train.optim import OptimConfig, make_optimizer
    from jaxalign.train.step import init_state, jit_train_step, make_train_step

    layers, remat = job["config"].split("/")
    n = job["warmup"] + job["steps"]
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    source = sft.ModelSource(path=job["model"], dtype="bfloat16" if job["precision"] == "bf16" else "float32",
                             param_dtype="float32", scan_layers=layers == "scan", remat=remat)
    lora_cfg = sft.LoRAConfig(**benchlib.LORA) if job["mode"] == "lora" else sft.LoRAConfig()
    # Loaded outside the mesh context, as `run_sft` does: shardings come from the names.
    cfg, trainable, frozen, frozen_sh, _, _ = sft.load_policy(source, lora_cfg, mesh, seed=0)
    with jax.set_mesh(mesh):
        optimizer, schedule = make_optimizer(
            OptimConfig(lr=LR, schedule="constant", weight_decay=0.0, max_grad_norm=1.0), n)
        # As in the training loop: the jitted init gives the moments their params' shardings.
        state = jax.jit(init_state, static_argnums=(1, 2))(trainable, optimizer, 0)
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        step_fn = jit_train_step(make_train_step(sft.sft_loss_fn(cfg), optimizer, schedule),
                                 state_sh, frozen_sh, batch_sharding(mesh))

        batches = []
        for tokens_BT in synthetic_tokens(job["vocab"], n, job["batch"], job["seq"]):
            b = packing.empty_batch(job["batch"], job["seq"], pad_id=0)
            for r, ids in enumerate(tokens_BT):
                packing.write_row(b, r, [(ids, np.ones(len(ids), np.float32))])
            batches.append(b)

        t0 = time.perf_counter()
        compiled = step_fn.lower(state, frozen, put_batch(batches[0], mesh)).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        rss_setup = benchlib.peak_rss_gib()
        times, losses = [], []
        for i, host_batch in enumerate(batches):
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, put_batch(host_batch, mesh))
            losses.append(float(jax.block_until_ready(metrics)["loss"]))
            if i >= job["warmup"]:
                times.append(time.perf_counter() - t0)
    return dict(compile_s=compile_s, step_s=statistics.median(times), loss1=losses[0], rss_setup=rss_setup,
                xla_temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2**30,
                device=benchlib.jax_device_name(), peak_dev_gib=benchlib.jax_peak_device_gib())


# ----------------------------------------------------------------------------- TRL

def run_trl(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    n = job["warmup"] + job["steps"]

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    tokens = synthetic_tokens(job["vocab"], n, job["batch"], job["seq"])
    # Pre-tokenized rows of exactly `seq` tokens: with skip_prepare_dataset the collator
    # makes labels = input_ids and an all-ones attention mask, so nothing is padded.
    data = datasets.Dataset.from_dict({"input_ids": tokens.reshape(-1, job["seq"]).tolist()})
    timer = benchlib.trl_step_timer("loss")
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, max_steps=n, per_device_train_batch_size=job["batch"],
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, gradient_checkpointing=job["config"] == "grad-ckpt on",
            bf16=job["precision"] == "bf16", use_cpu=not torch.cuda.is_available(), max_length=job["seq"], packing=False,
            dataset_kwargs={"skip_prepare_dataset": True}, train_sampling_strategy="sequential",
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
        trainer = SFTTrainer(model=job["model"], args=args, train_dataset=data,
                             processing_class=tokenizer, peft_config=benchlib.peft_lora(job["mode"]), callbacks=[timer])
        trainer.train()
    return dict(compile_s=None, step_s=statistics.median(timer.times[job["warmup"]:]),
                loss1=timer.logs[0]["loss"] if timer.logs else float("nan"), rss_setup=timer.rss_setup,
                threads=torch.get_num_threads(), device=benchlib.torch_device_name(),
                peak_dev_gib=benchlib.torch_peak_device_gib())


# ----------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--modes", default="full,lora", help="comma list of full, lora")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--ours", default="unrolled/none,unrolled/full,scan/none,scan/full",
                    help="jaxalign configs: layers (unrolled|scan) / remat (none|full|dots)")
    ap.add_argument("--trl-gc", default="on,off",
                    help="TRL gradient checkpointing settings to run (on is TRL's default)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    benchlib.add_allocator_arg(ap)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        return benchlib.worker(job, run_ours if job["side"] == "jaxalign" else run_trl)
    modes = benchlib.parse_list(ap, "--modes", args.modes, ("full", "lora"))
    ours = benchlib.parse_list(ap, "--ours", args.ours, benchlib.OURS_CONFIGS)
    trl_gc = benchlib.parse_list(ap, "--trl-gc", args.trl_gc, ("on", "off"))
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    command = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)  # before the re-exec
    allocator = benchlib.ensure_allocator(args.allocator)

    from fetch_smollm2 import fetch
    model = str(args.model or fetch())
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    common = dict(model=model, vocab=vocab, batch=args.batch, seq=args.seq, steps=args.steps,
                  warmup=args.warmup, precision=args.precision)
    load = os.getloadavg()
    rows, step_s, devices = [], {}, {}
    n_tok = args.batch * args.seq
    for mode in modes:
        jobs = [dict(side="jaxalign", config=c) for c in ours]
        jobs += [dict(side="trl", config=f"grad-ckpt {g}") for g in trl_gc]
        for job in jobs:
            job.update(common, mode=mode)
            r = benchlib.run_row(__file__, job, allocator, f"{job['side']} {job['mode']} {job['config']}",
                                 lambda r: f"{r['step_s']:.2f} s/step")
            if "error" in r:
                rows.append([job["side"], mode, args.precision, job["config"], r["error"]] + ["-"] * 7)
                continue
            c = r["compile_s"]
            rows.append([job["side"], mode, args.precision, job["config"],
                         "-" if c is None else c, r["step_s"], n_tok / r["step_s"],
                         r["rss_setup"], r["peak_rss_gib"], r.get("xla_temp_gib", "-"),
                         r.get("peak_dev_gib") or "-", f"{r['loss1']:.5f}"])
            devices[job["side"]] = r.get("device", "cpu")
            step_s[(mode, job["side"], job["config"])] = r["step_s"]

    alloc = (f"jemalloc (LD_PRELOAD={os.environ.get('LD_PRELOAD')} "
             f"MALLOC_CONF={os.environ.get('MALLOC_CONF')})" if allocator == "jemalloc" else "glibc malloc")
    print(f"\ncommand: {command}")
    print(f"allocator: {alloc}, both sides; {os.cpu_count()} CPUs, load average at start "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    benchlib.print_table(
        f"SFT step, {Path(model).name}, batch {args.batch} x {args.seq} tokens, {args.precision}, "
        f"median of {args.steps} steps after {args.warmup} warmup",
        ["side", "mode", "precision", "layers/remat | grad-ckpt", "compile s", "step s", "tok/s",
         "RSS setup GiB", "peak RSS GiB", "XLA temp GiB", "peak device GiB", "loss@1"], rows)
    print("RSS setup: peak RSS before the first step (model load, trainer set-up, our compile); "
          "XLA temp: the compiled step's scratch memory (memory_analysis); peak device: the "
          "accelerator allocator's peak (JAX memory_stats / torch max_memory_allocated), '-' on CPU")
    print("devices: " + ", ".join(f"{side} on {d}" for side, d in devices.items()))
    # Speedup = TRL step time / ours: for our best config and for our default (sft.ModelSource).
    for mode in modes:
        mine = {c: s for (m, side, c), s in step_s.items() if m == mode and side == "jaxalign"}
        picks = {}
        if mine:
            best = min(mine, key=mine.get)
            picks[f"best jaxalign ({best})"] = mine[best]
        if "unrolled/none" in mine:
            picks["jaxalign default (unrolled/none)"] = mine["unrolled/none"]
        for g in ("on", "off"):
            theirs = step_s.get((mode, "trl", f"grad-ckpt {g}"))
            for name, ours_s in picks.items() if theirs else ():
                print(f"{mode}: {name} {ours_s:.2f} s vs TRL grad-ckpt {g}"
                      f"{' (its default)' if g == 'on' else ''} {theirs:.2f} s: {theirs / ours_s:.2f}x")


if __name__ == "__main__":
    main()
