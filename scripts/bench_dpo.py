"""DPO training speed, jaxalign vs TRL `DPOTrainer`, on SmolLM2-135M, same pairs and allocator.

  python scripts/bench_dpo.py [--batch 4] [--prompt-len 128] [--response-len 128] [--steps 3]
                              [--warmup 1] [--modes full,lora] [--precision fp32|bf16]
                              [--allocator jemalloc|glibc]
                              [--ours unrolled/none,unrolled/full,scan/none,scan/full] [--trl-gc on,off]

Every row runs in its own subprocess (same allocator, inherited from this process) so that
its peak RSS is its own. Both sides train on the same synthetic pairs: random token ids, a
prompt of --prompt-len tokens and a chosen and a rejected response of --response-len tokens
each, so every sequence is exactly prompt + response tokens (no padding, no BOS / EOS added
by either side), in the same order. The trained targets are the response tokens: the first
one predicted from the last prompt token, the last response token the last target.
DPO sigmoid loss, beta 0.1, sequence log-prob = sum over response tokens; AdamW (same lr,
constant schedule, no weight decay), clipping at 1.0.

Reference model: full fine-tuning keeps a frozen copy of the starting weights on both sides
(ours: `load_dpo_models` with LoRA rank 0; TRL: its own `ref_model`). LoRA (rank 16, alpha 32,
on q_proj and v_proj, on both sides): the reference is the policy with the adapters disabled,
no second copy. bf16: ours computes in bf16 with fp32 params (fp32 accumulation); TRL uses
bf16 autocast (its default) on fp32 params.

TRL is fed pre-tokenized pairs: a `DPOTrainer` subclass whose `_prepare_dataset` returns the
dataset as it is, with columns prompt_ids / chosen_ids / rejected_ids, so TRL's own
`DataCollatorForPreference` builds input_ids = prompt + response and the completion mask
from exactly our token ids (TRL 1.16 otherwise always tokenizes text and appends EOS).

Step time is the median over --steps timed steps after --warmup steps. Ours: batch
transfer + the jitted step, blocked on; compile time is `lower().compile()`. TRL: from
`on_step_begin` to `on_step_end` (policy and reference forwards, backward, clip, optimizer).
pairs/s = batch / step time. "loss@1" and "logps/chosen@1" (the mean over pairs of the
summed response log-probs) are the first step's, on the same batch from the same weights:
policy == reference there, so loss@1 is log 2 on every row, and the first-step logps must
agree across sides: to 1e-3 relative in fp32 (smoke runs: ~3e-7), 1e-2 in bf16 (~1e-3).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib

LR = 1e-6      # TRL DPOConfig's default learning rate
BETA = 0.1
LOSS_TYPE = "sigmoid"


def synthetic_pairs(vocab: int, n_batches: int, batch: int, prompt_len: int, response_len: int):
    """(prompt (n, B, P), chosen (n, B, R), rejected (n, B, R)) int32 ids, identical in every
    subprocess (fixed seed). Ids from 3 up: no special token (SmolLM2's are 0-2)."""
    import numpy as np
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, vocab, (n_batches, batch, prompt_len), dtype=np.int32)
    chosen = rng.integers(3, vocab, (n_batches, batch, response_len), dtype=np.int32)
    rejected = rng.integers(3, vocab, (n_batches, batch, response_len), dtype=np.int32)
    return prompt, chosen, rejected


# ----------------------------------------------------------------------------- ours

def run_ours(job: dict) -> dict:
    import jax
    import numpy as np

    from jaxalign import sharding
    from jaxalign.config import MeshConfig
    from jaxalign.data.config import DataConfig, DatasetSpec
    from jaxalign.data.preference import empty_pair_batch, write_pair
    from jaxalign.train import dpo, sft
    from jaxalign.train.loop import TrainConfig, batch_sharding, put_batch
    from jaxalign.train.optim import OptimConfig, make_optimizer
    from jaxalign.train.step import init_state, jit_train_step, make_train_step

    layers, remat = job["config"].split("/")
    n = job["warmup"] + job["steps"]
    p_len, r_len = job["prompt_len"], job["response_len"]
    seq = p_len + r_len
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    source = sft.ModelSource(path=job["model"], dtype="bfloat16" if job["precision"] == "bf16" else "float32",
                             param_dtype="float32", scan_layers=layers == "scan", remat=remat)
    optim_cfg = OptimConfig(lr=LR, schedule="constant", weight_decay=0.0, max_grad_norm=1.0)
    cfg = dpo.DPOConfig(
        out_dir="unused: nothing is written", model=source,
        # Only seq_len matters here: the batches are built below, not by the data pipeline.
        data=DataConfig(train=(DatasetSpec(path="synthetic", format="preference"),), seq_len=seq),
        train=TrainConfig(steps=n, batch_size=job["batch"], seed=0, progress=False, tensorboard=False),
        optim=optim_cfg, lora=sft.LoRAConfig(**benchlib.LORA) if job["mode"] == "lora" else sft.LoRAConfig(),
        dpo=dpo.DPOOptions(beta=BETA, loss_type=LOSS_TYPE))
    # Loaded outside the mesh context, as `run_dpo` does: shardings come from the names.
    model_cfg, ref_cfg, trainable, frozen, frozen_sh, _, _ = dpo.load_dpo_models(cfg, mesh)
    assert (ref_cfg is None) == (job["mode"] == "lora"), "unexpected reference for the mode"
    with jax.set_mesh(mesh):
        optimizer, schedule = make_optimizer(optim_cfg, n)
        # As in the training loop: the jitted init gives the moments their params' shardings.
        state = jax.jit(init_state, static_argnums=(1, 2))(trainable, optimizer, 0)
        state_sh = jax.tree.map(lambda x: x.sharding, state)
        loss_fn = dpo.dpo_loss_fn(model_cfg, cfg.dpo, ref_cfg=ref_cfg, chunk=cfg.train.logits_chunk)
        step_fn = jit_train_step(make_train_step(loss_fn, optimizer, schedule),
                                 state_sh, frozen_sh, batch_sharding(mesh))

        # Row = (ids, weights): weight 1 on the response tokens, whose targets are trained.
        weights = np.concatenate([np.zeros(p_len, np.float32), np.ones(r_len, np.float32)])
        batches = []
        for prompt_BP, chosen_BR, rejected_BR in zip(*synthetic_pairs(
                job["vocab"], n, job["batch"], p_len, r_len)):
            b = empty_pair_batch(job["batch"], seq, pad_id=0)
            for r in range(job["batch"]):
                write_pair(b, r, ((np.concatenate([prompt_BP[r], chosen_BR[r]]), weights),
                                  (np.concatenate([prompt_BP[r], rejected_BR[r]]), weights), p_len))
            batches.append(b)

        t0 = time.perf_counter()
        compiled = step_fn.lower(state, frozen, put_batch(batches[0], mesh)).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        rss_setup = benchlib.peak_rss_gib()
        times, first = [], None
        for i, host_batch in enumerate(batches):
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, put_batch(host_batch, mesh))
            metrics = jax.block_until_ready(metrics)
            if i >= job["warmup"]:
                times.append(time.perf_counter() - t0)
            if first is None:
                first = {k: float(metrics[k]) for k in ("loss", "logps/chosen", "logps/rejected")}
    return dict(compile_s=compile_s, step_s=statistics.median(times), loss1=first["loss"],
                logps_chosen1=first["logps/chosen"], logps_rejected1=first["logps/rejected"],
                rss_setup=rss_setup, xla_temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2**30,
                device=benchlib.jax_device_name(), peak_dev_gib=benchlib.jax_peak_device_gib())


# ----------------------------------------------------------------------------- TRL

def run_trl(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    n = job["warmup"] + job["steps"]
    p_len, r_len = job["prompt_len"], job["response_len"]

    class PreTokenizedDPOTrainer(DPOTrainer):
        """TRL 1.16 always tokenizes text pairs (and appends EOS) in `_prepare_dataset`; the
        dataset here already has the columns that step produces, so it is used as is."""
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    tokenizer = AutoTokenizer.from_pretrained(job["model"])
    prompt, chosen, rejected = synthetic_pairs(job["vocab"], n, job["batch"], p_len, r_len)
    # Pair order = ours: batch i is pairs [i * B, (i + 1) * B) under the sequential sampler.
    data = datasets.Dataset.from_dict({"prompt_ids": prompt.reshape(-1, p_len).tolist(),
                                       "chosen_ids": chosen.reshape(-1, r_len).tolist(),
                                       "rejected_ids": rejected.reshape(-1, r_len).tolist()})
    timer = benchlib.trl_step_timer("loss")
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(
            output_dir=out, max_steps=n, per_device_train_batch_size=job["batch"],
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, gradient_checkpointing=job["config"] == "grad-ckpt on",
            bf16=job["precision"] == "bf16", use_cpu=not torch.cuda.is_available(), beta=BETA, loss_type=[LOSS_TYPE],
            max_length=p_len + r_len, pad_to_multiple_of=None, precompute_ref_log_probs=False,
            train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
            report_to="none", disable_tqdm=True, seed=0)
        trainer = PreTokenizedDPOTrainer(model=job["model"], args=args, train_dataset=data,
                                         processing_class=tokenizer, peft_config=benchlib.peft_lora(job["mode"]),
                                         callbacks=[timer])
        assert (trainer.ref_model is None) == (job["mode"] == "lora"), "unexpected reference for the mode"
        # The first batch as TRL's collator builds it must be exactly our rows, unpadded.
        first = trainer.data_collator([data[i] for i in range(job["batch"])])
        want = torch.cat([torch.cat([torch.from_numpy(prompt[0]), torch.from_numpy(side[0])], 1)
                          for side in (chosen, rejected)]).long()
        assert torch.equal(first["input_ids"], want), "TRL's batch differs from ours"
        assert bool(first["attention_mask"].all()), "TRL padded the batch"
        assert int(first["completion_mask"].sum()) == 2 * job["batch"] * r_len
        trainer.train()
    log1 = timer.logs[0] if timer.logs else {}
    nan = float("nan")
    return dict(compile_s=None, step_s=statistics.median(timer.times[job["warmup"]:]),
                loss1=log1.get("loss", nan), logps_chosen1=log1.get("logps/chosen", nan),
                logps_rejected1=log1.get("logps/rejected", nan), rss_setup=timer.rss_setup,
                threads=torch.get_num_threads(), device=benchlib.torch_device_name(),
                peak_dev_gib=benchlib.torch_peak_device_gib())


# ----------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of every pair")
    ap.add_argument("--response-len", type=int, default=128, help="tokens of each response")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--modes", default="full,lora", help="comma list of full, lora")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--ours", default="unrolled/none,unrolled/full,scan/none,scan/full",
                    help="jaxalign configs: layers (unrolled|scan) / remat (none|full|dots)")
    ap.add_argument("--trl-gc", default="on",
                    help="TRL gradient checkpointing settings to run, comma list of on, off "
                         "(on is TRL's default)")
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
    if args.batch < 1 or args.prompt_len < 1 or args.response_len < 1:
        ap.error("--batch, --prompt-len and --response-len must be >= 1")
    command = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)  # before the re-exec
    allocator = benchlib.ensure_allocator(args.allocator)

    from fetch_smollm2 import fetch
    model = str(args.model or fetch())
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    common = dict(model=model, vocab=vocab, batch=args.batch, prompt_len=args.prompt_len,
                  response_len=args.response_len, steps=args.steps, warmup=args.warmup,
                  precision=args.precision)
    load = os.getloadavg()
    rows, step_s, logps, devices = [], {}, {}, {}
    for mode in modes:
        jobs = [dict(side="jaxalign", config=c) for c in ours]
        jobs += [dict(side="trl", config=f"grad-ckpt {g}") for g in trl_gc]
        for job in jobs:
            job.update(common, mode=mode)
            r = benchlib.run_row(__file__, job, allocator, f"{job['side']} {job['mode']} {job['config']}",
                                 lambda r: f"{r['step_s']:.2f} s/step, logps/chosen@1 "
                                           f"{r['logps_chosen1']:.4f}")
            if "error" in r:
                rows.append([job["side"], mode, args.precision, job["config"], r["error"]] + ["-"] * 9)
                continue
            c = r["compile_s"]
            rows.append([job["side"], mode, args.precision, job["config"],
                         "-" if c is None else c, r["step_s"], args.batch / r["step_s"],
                         r["rss_setup"], r["peak_rss_gib"], r.get("xla_temp_gib", "-"),
                         r.get("peak_dev_gib") or "-",
                         f"{r['loss1']:.5f}", f"{r['logps_chosen1']:.3f}", f"{r['logps_rejected1']:.3f}"])
            devices[job["side"]] = r.get("device", "cpu")
            step_s[(mode, job["side"], job["config"])] = r["step_s"]
            logps[(mode, job["side"], job["config"])] = (r["logps_chosen1"], r["logps_rejected1"])

    seq = args.prompt_len + args.response_len
    alloc = (f"jemalloc (LD_PRELOAD={os.environ.get('LD_PRELOAD')} "
             f"MALLOC_CONF={os.environ.get('MALLOC_CONF')})" if allocator == "jemalloc" else "glibc malloc")
    print(f"\ncommand: {command}")
    print(f"allocator: {alloc}, both sides; {os.cpu_count()} CPUs, load average at start "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    benchlib.print_table(
        f"DPO step ({LOSS_TYPE}, beta {BETA}), {Path(model).name}, batch {args.batch} pairs x 2 x {seq} tokens "
        f"(prompt {args.prompt_len} + response {args.response_len}), {args.precision}, "
        f"median of {args.steps} steps after {args.warmup} warmup",
        ["side", "mode", "precision", "layers/remat | grad-ckpt", "compile s", "step s", "pairs/s",
         "RSS setup GiB", "peak RSS GiB", "XLA temp GiB", "peak device GiB", "loss@1", "logps/chosen@1",
         "logps/rejected@1"],
        rows)
    print("RSS setup: peak RSS before the first step (model load, trainer set-up, our compile); "
          "XLA temp: the compiled step's scratch memory (memory_analysis); @1: the first step's "
          f"metrics (loss@1 must be log 2 = {math.log(2):.5f}, logps must agree across rows); "
          "peak device: the accelerator allocator's peak, '-' on CPU")
    print("devices: " + ", ".join(f"{side} on {d}" for side, d in devices.items()))
    # First-step agreement: every row against the first TRL row of the mode (else the first row).
    # bf16 rounds differently on the two sides (~1e-3 relative each way, seen on a smoke run).
    tol = 1e-3 if args.precision == "fp32" else 1e-2
    for mode in modes:
        got = {k: v for k, v in logps.items() if k[0] == mode}
        if len(got) < 2:
            continue
        ref_key = next((k for k in got if k[1] == "trl"), next(iter(got)))
        ref_c, ref_r = got[ref_key]
        worst = max(max(abs(c - ref_c) / abs(ref_c), abs(r - ref_r) / abs(ref_r))
                    for c, r in got.values())
        verdict = "OK" if worst < tol else "MISMATCH"
        print(f"{mode}: first-step logps (chosen, rejected), max relative difference to "
              f"{ref_key[1]} {ref_key[2]}: {worst:.2e} ({verdict}, tolerance {tol:g} for {args.precision})")
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
                print(f"{mode}: {name} {ours_s:.2f} s ({args.batch / ours_s:.3f} pairs/s) vs "
                      f"TRL grad-ckpt {g}{' (its default)' if g == 'on' else ''} {theirs:.2f} s "
                      f"({args.batch / theirs:.3f} pairs/s): {theirs / ours_s:.2f}x")


if __name__ == "__main__":
    main()
