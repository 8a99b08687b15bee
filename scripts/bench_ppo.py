"""PPO / GRPO speed, jaxalign vs transformers `generate` and TRL `GRPOTrainer`, same prompts.

On SmolLM2-135M by default; every comparison uses the same model, prompts, lengths and allocator.

  python scripts/bench_ppo.py [--parts rollout,grpo,ppo] [--batch 2] [--generations 4]
                              [--max-new-tokens 24] [--max-prompt-len 96] [--temperature 0.9]
                              [--top-p 1.0] [--epochs 2] [--minibatches 2] [--steps 3] [--warmup 1]
                              [--modes full,lora] [--precision fp32|bf16] [--decode scan,unrolled]
                              [--ours unrolled/none,scan/full] [--trl-gc on,off] [--model DIR]
                              [--torch-threads N] [--allocator jemalloc|glibc]

Every row runs in its own subprocess (same allocator, inherited from this process) so that
its peak RSS is its own.

Prompts, the same on every row: arithmetic tasks of `jaxalign.synth.tasks` (seed 0), rendered
with the tokenizer's chat template + generation prompt and tokenized without added special
tokens (what `jaxalign ppo` does with data.chat: true, and TRL with conversational prompts;
the TRL row checks that its token ids are ours); prompts over --max-prompt-len tokens are
skipped. Each of --batch prompts is repeated --generations times (consecutive rows), so a
rollout has rows = batch x generations. bf16: ours computes in bf16 with fp32 params; torch
runs bf16 autocast on fp32 params (as TRL's trainers do). Threads: each library's default
(XLA and torch both use every core) unless --torch-threads; on a CPU shared with another busy
process torch's thread pool degrades far more than XLA's (seen on 2 cores under load 2:
transformers `generate` of a tiny model 50x slower at 2 threads than at 1), so read the load
average printed with the tables.

rollout: sampling throughput. Ours: the KV-cache sampler `jaxalign.generate.generate` (the
function the PPO rollout samples with inside its jitted program), jitted alone with the
rollout's settings; --decode picks its layer layout (rollout.decode_scan_layers). Theirs:
`model.generate(do_sample=True, temperature, top_p, top_k=0, max_new_tokens)` (KV cache). Both
get the same left-padded (tokens, mask) arrays, padded to our bucket length. Both generate
exactly --max-new-tokens tokens on every row: ours with no EOS ids (it never stops early),
transformers with min_new_tokens = max_new_tokens (EOS banned until then); tokens/s =
rows x max_new_tokens / step time. Step time: the median over --steps timed calls, after
--warmup untimed calls, each with its own seed, blocked on the tokens on the host (CUDA:
synchronized). Our compile (`lower().compile()`) is timed separately, never in a step.

grpo: one GRPO iteration. Ours: `run_rl`, the driver of `jaxalign ppo` with algorithm grpo:
rollout (sample + policy and reference log-prob forwards) -> the python reward
`jaxalign.rewards:arithmetic` -> group-normalised advantages -> --epochs x --minibatches
optimizer steps; iteration, rollout (to the advantages) and update seconds from its
perf.jsonl; compile s = its three programs' `lower().compile()`, before iteration 1.
Theirs: `GRPOTrainer` with per_device_train_batch_size = rows / minibatches,
gradient_accumulation_steps 1, steps_per_generation = minibatches (so generation_batch_size =
rows) and num_iterations = epochs: one generation, then epochs x minibatches optimizer
steps, as ours; iteration s = the sum of those steps' on_step_begin -> on_step_end times
(the first holds the generation), rollout s = time in `_generate_and_score_completions`
(generate, log-prob forwards, rewards, advantages). Iterations: the median over --steps after
--warmup. Matched: prompts and their order (no shuffling on either side), num_generations,
max_new_tokens, temperature, top_p (no top-k), EOS ends a completion, the same reward logic
(TRL gets the prompt's user turn and the completion's text), beta (k3 KL in the loss, so both
compute reference log-probs: a frozen copy in full mode, adapters off with LoRA), clip 0.2,
group std scaling, token mean over the minibatch (TRL loss_type "bnpo"), AdamW (same lr,
constant, no weight decay), clipping at 1.0. Not matched: completions differ (sampling), so
the table gives each side's mean response length and response tokens per second of
iteration; TRL pads prompts to the longest in its batch, ours to a bucket; ours always
recomputes the policy's log-probs after sampling, TRL only when a generation serves more than
one step (epochs x minibatches > 1); ours draws new minibatches every epoch, TRL shuffles once
per generation; TRL runs its log-prob forwards in chunks of per_device_train_batch_size rows;
TRL's gradient checkpointing (on by default) vs our remat (--trl-gc, --ours).

ppo: TRL 1.16 has no PPO trainer (checked: trl.PPOTrainer, trl.experimental.ppo); a line says
so and our PPO iteration (shared value head, k1 KL penalty in the reward, GAE) is reported
alone, same rollout and update sizes as grpo.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import benchlib

PARTS = ("rollout", "grpo", "ppo")
LR = 1e-6          # TRL GRPOConfig's default learning rate
BETA = 0.04        # GRPO's KL coefficient (ours' default; TRL's default 0 skips the reference)
CLIP_EPS = 0.2
PPO_KL_COEF = 0.05
REWARD = "jaxalign.rewards:arithmetic"


def task_prompts(model: str, n: int, max_len: int) -> tuple[list[str], list[list[int]]]:
    """The first n arithmetic prompts of at most max_len tokens: (user texts, token ids),
    rendered as `jaxalign.train.rollout.read_prompts` does with data.chat: true."""
    from jaxalign.synth.tasks import make_tasks, prompt_of
    from jaxalign.tokenizer import load_tokenizer

    tok = load_tokenizer(model)  # jaxalign's (no torch); TRL's AutoTokenizer reads the same files
    texts, ids = [], []
    for row in make_tasks(4 * n + 64, seed=0, kinds=("arithmetic",)):
        rendered = tok.apply_chat_template([{"role": "user", "content": prompt_of(row)}],
                                           tokenize=False, add_generation_prompt=True)
        row_ids = tok(rendered, add_special_tokens=False).input_ids
        if len(row_ids) <= max_len:
            texts.append(prompt_of(row))
            ids.append(row_ids)
            if len(texts) == n:
                return texts, ids
    sys.exit(f"only {len(texts)} of {4 * n + 64} arithmetic prompts fit in --max-prompt-len "
             f"{max_len} tokens; {n} needed")


def rollout_arrays(job: dict):
    """Left-padded (tokens, mask) int32 of the rollout part's rows, and the pad id."""
    import numpy as np
    from jaxalign.tokenizer import load_tokenizer

    pad_id = int(load_tokenizer(job["model"]).pad_token_id)
    _, ids = task_prompts(job["model"], job["batch"], job["max_prompt_len"])
    rows = [r for r in ids for _ in range(job["generations"])]
    P = job["prompt_pad"]
    tokens_BP = np.full((len(rows), P), pad_id, np.int32)
    mask_BP = np.zeros((len(rows), P), np.int32)
    for b, r in enumerate(rows):
        tokens_BP[b, P - len(r):], mask_BP[b, P - len(r):] = r, 1
    return tokens_BP, mask_BP, pad_id


def _median_after(values: list[float], warmup: int) -> float:
    return statistics.median(values[warmup:])


# ----------------------------------------------------------------------------- rollout

def run_ours_rollout(job: dict) -> dict:
    import jax
    import numpy as np

    from jaxalign import sharding
    from jaxalign.config import MeshConfig
    from jaxalign.generate import make_generate_fn
    from jaxalign.train import sft
    from jaxalign.train.loop import put_batch

    tokens_BP, mask_BP, pad_id = rollout_arrays(job)
    N = job["max_new_tokens"]
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    source = sft.ModelSource(path=job["model"], param_dtype="float32",
                             dtype="bfloat16" if job["precision"] == "bf16" else "float32")
    # Loaded as the RL driver loads the policy (unrolled params); the decode layout is a
    # config switch over the same params, as in `rollout.rollout`.
    cfg, params, _, _, _, _ = sft.load_policy(source, sft.LoRAConfig(), mesh, seed=0)
    gen_cfg = cfg.replace(scan_layers=job["config"] == "scan")
    # No EOS ids: every row generates exactly N tokens (the while_loop's stop never fires).
    fn = make_generate_fn(gen_cfg, N, float(job["temperature"]), 0, float(job["top_p"]), (), pad_id)
    with jax.set_mesh(mesh):
        dev = put_batch({"p": tokens_BP, "m": mask_BP}, mesh)
        keys = [jax.random.PRNGKey(i) for i in range(job["warmup"] + job["steps"])]
        t0 = time.perf_counter()
        compiled = fn.lower(params, dev["p"], dev["m"], keys[0]).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for key in keys:
            t0 = time.perf_counter()
            out = compiled(params, dev["p"], dev["m"], key)
            tokens_BN, lengths_B = np.asarray(out["tokens_BN"]), np.asarray(out["lengths_B"])
            times.append(time.perf_counter() - t0)
            assert tokens_BN.shape == (len(tokens_BP), N) and (lengths_B == N).all(), lengths_B
    return dict(compile_s=compile_s, step_s=_median_after(times, job["warmup"]),
                device=benchlib.jax_device_name(), peak_dev_gib=benchlib.jax_peak_device_gib())


def run_hf_rollout(job: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    tokens_BP, mask_BP, pad_id = rollout_arrays(job)
    N = job["max_new_tokens"]
    if job["torch_threads"]:
        torch.set_num_threads(job["torch_threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).to(device).eval()
    ids = torch.from_numpy(tokens_BP).long().to(device)
    mask = torch.from_numpy(mask_BP).long().to(device)
    # top_k=0 switches off transformers' default top-k of 50; min_new_tokens bans EOS until N.
    gen = dict(do_sample=True, temperature=job["temperature"], top_p=job["top_p"], top_k=0,
               max_new_tokens=N, min_new_tokens=N, pad_token_id=pad_id)
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                if job["precision"] == "bf16" else contextlib.nullcontext())
    times = []
    for i in range(job["warmup"] + job["steps"]):
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            out = model.generate(input_ids=ids, attention_mask=mask, **gen)
        new = out[:, ids.shape[1]:].cpu()  # also waits for CUDA
        times.append(time.perf_counter() - t0)
        assert new.shape == (len(tokens_BP), N), new.shape
    return dict(compile_s=None, step_s=_median_after(times, job["warmup"]),
                threads=torch.get_num_threads(), device=benchlib.torch_device_name(),
                peak_dev_gib=benchlib.torch_peak_device_gib())


# ----------------------------------------------------------------------------- GRPO / PPO: ours

def run_ours_rl(job: dict) -> dict:
    import jax

    from jaxalign.config import from_dict
    from jaxalign.tokenizer import load_tokenizer
    from jaxalign.train import rl, rollout as R
    from jaxalign.train.ppo import RLConfig

    iterations = job["warmup"] + job["steps"]
    texts, ids = task_prompts(job["model"], job["batch"] * iterations, job["max_prompt_len"])
    layers, remat = job["config"].split("/")
    # The driver compiles its programs (rollout, advantages, train step) ahead of iteration 1
    # through `rl.compiled`; timing that call separates compile time from the iterations.
    compile_s = []
    real_compiled = rl.compiled

    def timed_compiled(*args):
        t0 = time.perf_counter()
        exe = real_compiled(*args)
        compile_s.append(time.perf_counter() - t0)
        return exe

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n"
                                   for t in texts))
        raw = {"out_dir": str(Path(tmp) / "run"), "algorithm": job["part"],
               "model": {"path": job["model"], "param_dtype": "float32",
                         "dtype": "bfloat16" if job["precision"] == "bf16" else "float32",
                         "scan_layers": layers == "scan", "remat": remat},
               # In order, batch prompts an iteration: the TRL row sees the same ones.
               "data": {"prompts": str(prompts), "chat": True, "shuffle": False,
                        "max_prompt_len": job["max_prompt_len"]},
               "rollout": {"batch_size": job["batch"], "num_generations": job["generations"],
                           "max_new_tokens": job["max_new_tokens"], "temperature": job["temperature"],
                           "top_p": job["top_p"], "decode_scan_layers": job["decode"] == "scan"},
               "reward": {"functions": [REWARD]},
               "ppo": {"epochs": job["epochs"], "minibatches": job["minibatches"],
                       "clip_eps": CLIP_EPS, "kl_coef": PPO_KL_COEF, "value_model": "shared"},
               "grpo": {"beta": BETA},
               "train": {"iterations": iterations, "sample_every": 0, "tensorboard": False,
                         "progress": False},
               "optim": {"lr": LR, "schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0},
               "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}
        if job["mode"] == "lora":
            lora = benchlib.LORA
            raw["lora"] = {"rank": lora["rank"], "alpha": lora["alpha"], "targets": list(lora["targets"])}
        cfg = from_dict(RLConfig, raw)
        assert R.read_prompts(cfg.data, load_tokenizer(job["model"])).ids == ids, "prompt ids differ"
        rl.compiled = timed_compiled
        try:
            rl.run_rl(cfg, raw, devices=jax.devices()[:1])
        finally:
            rl.compiled = real_compiled
        run = Path(tmp) / "run"
        perf = [json.loads(l) for l in (run / "perf.jsonl").read_text().splitlines()]
        metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(perf) == iterations, f"{len(perf)} iterations logged, {iterations} expected"
    timed = metrics[job["warmup"]:]
    return dict(compile_s=sum(compile_s),
                iteration_s=_median_after([p["iteration_s"] for p in perf], job["warmup"]),
                rollout_s=_median_after([p["rollout_s"] for p in perf], job["warmup"]),
                update_s=_median_after([p["update_s"] for p in perf], job["warmup"]),
                opt_steps=statistics.mean(m["epochs"] for m in timed) * job["minibatches"],
                response_length=statistics.mean(m["response_length"] for m in timed),
                reward=statistics.mean(m["reward_mean"] for m in timed),
                device=benchlib.jax_device_name(), peak_dev_gib=benchlib.jax_peak_device_gib())


# ----------------------------------------------------------------------------- GRPO: TRL

def trl_arithmetic(prompts, completions, **kwargs) -> list[float]:
    """`jaxalign.rewards.arithmetic` under TRL's signature: conversational prompts and
    completions come as message lists; ours sees the last user turn and the text."""
    from jaxalign.rewards import arithmetic
    return arithmetic([p[-1]["content"] for p in prompts], [c[-1]["content"] for c in completions])


def run_trl_grpo(job: dict) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    iterations = job["warmup"] + job["steps"]
    texts, ids = task_prompts(job["model"], job["batch"] * iterations, job["max_prompt_len"])
    rows = job["batch"] * job["generations"]
    steps_per_iteration = job["epochs"] * job["minibatches"]
    cuda = torch.cuda.is_available()
    if job["torch_threads"]:
        torch.set_num_threads(job["torch_threads"])
    rollout_times = []

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the rollout: generation, log-prob forwards, rewards, advantages."""
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            if cuda:
                torch.cuda.synchronize()
            rollout_times.append(time.perf_counter() - t0)
            return out

    data = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in texts]})
    timer = benchlib.trl_step_timer("completions/mean_length")
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, max_steps=iterations * steps_per_iteration,
            per_device_train_batch_size=rows // job["minibatches"], gradient_accumulation_steps=1,
            steps_per_generation=job["minibatches"], num_iterations=job["epochs"],
            num_generations=job["generations"], max_completion_length=job["max_new_tokens"],
            temperature=job["temperature"], top_p=job["top_p"], top_k=0,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, beta=BETA, epsilon=CLIP_EPS, loss_type="bnpo", scale_rewards="group",
            shuffle_dataset=False, gradient_checkpointing=job["config"] == "grad-ckpt on",
            bf16=job["precision"] == "bf16", use_cpu=not cuda, model_init_kwargs={"dtype": "float32"},
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0)
        assert args.generation_batch_size == rows, args.generation_batch_size
        trainer = TimedGRPOTrainer(model=job["model"], args=args, train_dataset=data,
                                   reward_funcs=[trl_arithmetic],
                                   processing_class=AutoTokenizer.from_pretrained(job["model"]),
                                   peft_config=benchlib.peft_lora(job["mode"]), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)  # its per-step log lines; the timer keeps them
        assert (trainer.ref_model is None) == (job["mode"] == "lora"), "unexpected reference for the mode"
        theirs = trainer._tokenize_prompts(list(data["prompt"]))[0]
        assert [list(r) for r in theirs] == ids, "TRL's prompt token ids differ from ours"
        trainer.train()
    assert len(timer.times) == iterations * steps_per_iteration, len(timer.times)
    per_iteration = [sum(timer.times[i * steps_per_iteration:(i + 1) * steps_per_iteration])
                     for i in range(iterations)]
    rollout = rollout_times  # one per generation, i.e. per iteration
    assert len(rollout) == iterations, len(rollout)
    timed_logs = timer.logs[job["warmup"]:]
    nan = float("nan")
    return dict(compile_s=None, iteration_s=_median_after(per_iteration, job["warmup"]),
                rollout_s=_median_after(rollout, job["warmup"]),
                update_s=_median_after([t - r for t, r in zip(per_iteration, rollout)], job["warmup"]),
                opt_steps=steps_per_iteration,
                response_length=(statistics.mean(l["completions/mean_length"] for l in timed_logs)
                                 if timed_logs else nan),
                reward=statistics.mean(l.get("reward", nan) for l in timed_logs) if timed_logs else nan,
                threads=torch.get_num_threads(), device=benchlib.torch_device_name(),
                peak_dev_gib=benchlib.torch_peak_device_gib())


def trl_ppo_trainer() -> str | None:
    """Where the installed TRL keeps a PPO trainer, or None. Looks without importing torch."""
    import importlib.util
    try:
        import trl
    except ImportError:
        return None
    if "PPOTrainer" in dir(trl):
        return "trl.PPOTrainer"
    for mod in ("trl.experimental.ppo", "trl.trainer.ppo_trainer"):
        try:
            with warnings.catch_warnings():  # importing trl.experimental warns that it is unstable
                warnings.simplefilter("ignore")
                if importlib.util.find_spec(mod) is not None:
                    return mod
        except ImportError:
            continue
    return None


# ----------------------------------------------------------------------------- driver

RUNNERS = {("rollout", "jaxalign"): run_ours_rollout, ("rollout", "transformers"): run_hf_rollout,
           ("grpo", "jaxalign"): run_ours_rl, ("grpo", "trl"): run_trl_grpo,
           ("ppo", "jaxalign"): run_ours_rl}


def _opt(x):
    return "-" if x is None else x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: the cached SmolLM2-135M-Instruct)")
    ap.add_argument("--parts", default="rollout,grpo,ppo", help="comma list of rollout, grpo, ppo")
    ap.add_argument("--batch", type=int, default=2, help="prompts per rollout")
    ap.add_argument("--generations", type=int, default=4, help="completions per prompt (>= 2 for grpo)")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-prompt-len", type=int, default=96, help="longer prompts are skipped")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=2, help="update passes over each rollout")
    ap.add_argument("--minibatches", type=int, default=2, help="optimizer steps per pass")
    ap.add_argument("--steps", type=int, default=3, help="timed calls / iterations (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls / iterations first")
    ap.add_argument("--modes", default="full", help="grpo/ppo: comma list of full, lora")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--decode", default="scan",
                    help="our sampler's layer layout(s), comma list of scan, unrolled: one rollout "
                         "row each; grpo / ppo decode with the first")
    ap.add_argument("--ours", default="unrolled/none",
                    help="grpo/ppo: our training configs, layers (unrolled|scan) / remat (none|full|dots)")
    ap.add_argument("--trl-gc", default="on",
                    help="grpo: TRL gradient checkpointing settings, comma list of on, off "
                         "(on is TRL's default)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads in the torch rows (0: torch's default)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    benchlib.add_allocator_arg(ap)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(args.worker)
        return benchlib.worker(job, RUNNERS[job["part"], job["side"]])
    parts = benchlib.parse_list(ap, "--parts", args.parts, PARTS)
    modes = benchlib.parse_list(ap, "--modes", args.modes, ("full", "lora"))
    decode = benchlib.parse_list(ap, "--decode", args.decode, ("scan", "unrolled"))
    trl_gc = benchlib.parse_list(ap, "--trl-gc", args.trl_gc, ("on", "off"))
    ours = benchlib.parse_list(ap, "--ours", args.ours, benchlib.OURS_CONFIGS)
    if not (parts and modes and decode and trl_gc and ours):
        ap.error("--parts, --modes, --decode, --ours and --trl-gc must each name at least one")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.torch_threads < 0:
        ap.error("--torch-threads must be >= 0")
    for flag in ("batch", "generations", "max_new_tokens", "max_prompt_len", "epochs", "minibatches"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    rows = args.batch * args.generations
    if "grpo" in parts and args.generations < 2:
        ap.error("grpo needs --generations >= 2 (a group to compare within)")
    if rows % args.minibatches:
        ap.error(f"--batch x --generations = {rows} rows must split into --minibatches {args.minibatches}")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        ap.error("--temperature must be > 0 and --top-p in (0, 1]")
    command = " ".join(shlex.quote(a) for a in ["python"] + sys.argv)  # before the re-exec
    allocator = benchlib.ensure_allocator(args.allocator)

    from fetch_smollm2 import fetch
    from jaxalign.generate import bucket_length
    model = str(Path(args.model).expanduser().resolve() if args.model else fetch())
    _, ids = task_prompts(model, args.batch * (args.warmup + args.steps), args.max_prompt_len)
    common = dict(model=model, batch=args.batch, generations=args.generations,
                  max_new_tokens=args.max_new_tokens, max_prompt_len=args.max_prompt_len,
                  temperature=args.temperature, top_p=args.top_p, epochs=args.epochs,
                  minibatches=args.minibatches, steps=args.steps, warmup=args.warmup,
                  precision=args.precision, decode=decode[0], torch_threads=args.torch_threads,
                  prompt_pad=bucket_length(max(len(r) for r in ids[:args.batch])))
    load = os.getloadavg()
    results: dict[str, list] = {p: [] for p in parts}
    devices = {}
    for part in parts:
        if part == "rollout":
            jobs = [dict(side="jaxalign", config=d) for d in decode]
            jobs.append(dict(side="transformers", config="generate"))
        else:
            jobs = [dict(side="jaxalign", mode=m, config=c) for m in modes for c in ours]
            if part == "grpo":
                jobs += [dict(side="trl", mode=m, config=f"grad-ckpt {g}") for m in modes for g in trl_gc]
        for job in jobs:
            job = dict(common, part=part, **job)
            label = f"{job['part']} {job['side']} {job.get('mode', '')} {job['config']}".replace("  ", " ")
            key = "step_s" if job["part"] == "rollout" else "iteration_s"
            r = benchlib.run_row(__file__, job, allocator, label, lambda r: f"{r[key]:.3f} s")
            results[part].append((job, r))
            if "error" not in r:
                threads = f" (torch threads {r['threads']})" if "threads" in r else ""
                devices[job["side"]] = r.get("device", "cpu") + threads
    trl_ppo = trl_ppo_trainer() if "ppo" in parts else None

    alloc = (f"jemalloc (LD_PRELOAD={os.environ.get('LD_PRELOAD')} "
             f"MALLOC_CONF={os.environ.get('MALLOC_CONF')})" if allocator == "jemalloc" else "glibc malloc")
    print(f"\ncommand: {command}")
    print(f"allocator: {alloc}, every row; {os.cpu_count()} CPUs, load average at start "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"model: {model}; {rows} rows = {args.batch} prompts x {args.generations} generations, "
          f"prompts <= {args.max_prompt_len} tokens, temperature {args.temperature}, top_p {args.top_p}, "
          f"{args.precision}")
    print("devices: " + ", ".join(f"{side} on {d}" for side, d in devices.items()))
    N = args.max_new_tokens
    if "rollout" in parts:
        table, step = [], {}
        for job, r in results["rollout"]:
            name = f"decode {job['config']}" if job["side"] == "jaxalign" else job["config"]
            if "error" in r:
                table.append([job["side"], name, r["error"]] + ["-"] * 5)
                continue
            step[job["side"], job["config"]] = r["step_s"]
            table.append([job["side"], name, _opt(r["compile_s"]), r["step_s"], rows * N / r["step_s"],
                          r["peak_rss_gib"], _opt(r.get("peak_dev_gib")), r.get("device", "-")])
        benchlib.print_table(
            f"rollout: {rows} rows x {N} new tokens (no early stop), prompts left-padded to "
            f"{common['prompt_pad']}, median of {args.steps} calls after {args.warmup} warmup",
            ["side", "sampler", "compile s", "step s", "new tok/s", "peak RSS GiB",
             "peak device GiB", "device"], table)
        theirs = step.get(("transformers", "generate"))
        for (side, config), s in step.items():
            if side == "jaxalign" and theirs:
                print(f"rollout: transformers generate {theirs:.3f} s vs jaxalign decode {config} "
                      f"{s:.3f} s per call: {theirs / s:.2f}x")
        print("new tok/s: rows x new tokens / step s; compile s: our lower().compile(), outside the "
              "steps; peak device: the accelerator allocator's peak, '-' on CPU")
    for part in ("grpo", "ppo"):
        if part not in parts:
            continue
        if part == "ppo":
            print(f"\nppo: TRL {_version('trl')} has no PPO trainer (looked for trl.PPOTrainer, "
                  "trl.experimental.ppo): ours only" if trl_ppo is None else
                  f"\nppo: TRL {_version('trl')} has {trl_ppo}, which this script does not drive "
                  "yet: ours only")
        table, it = [], {}
        for job, r in results[part]:
            head = [job["side"], job["mode"], job["config"]]
            if "error" in r:
                table.append(head + [r["error"]] + ["-"] * 10)
                continue
            it[job["mode"], job["side"], job["config"]] = r["iteration_s"]
            table.append(head + [_opt(r["compile_s"]), r["iteration_s"], r["rollout_s"], r["update_s"],
                                 r["opt_steps"], r["response_length"],
                                 rows * r["response_length"] / r["iteration_s"], f"{r['reward']:.3f}",
                                 r["peak_rss_gib"], _opt(r.get("peak_dev_gib"))])
        benchlib.print_table(
            f"{part}: one iteration = {rows} rows x <= {N} new tokens, then {args.epochs} epochs x "
            f"{args.minibatches} minibatches of {rows // args.minibatches} rows; median of "
            f"{args.steps} iterations after {args.warmup} warmup; our decode {decode[0]}",
            ["side", "mode", "layers/remat | grad-ckpt", "compile s", "iteration s", "rollout s",
             "update s", "opt steps", "resp len", "resp tok/s", "reward", "peak RSS GiB",
             "peak device GiB"], table)
        for mode in modes:
            mine = {c: s for (m, side, c), s in it.items() if m == mode and side == "jaxalign"}
            for (m, side, c), theirs in it.items():
                if m != mode or side != "trl":
                    continue
                for config, s in mine.items():
                    print(f"{part} {mode}: TRL {c} {theirs:.3f} s vs jaxalign {config} {s:.3f} s "
                          f"per iteration: {theirs / s:.2f}x")
    if "grpo" in parts or "ppo" in parts:
        print("rollout s: sampling + log-prob forwards + rewards + advantages; update s: the optimizer "
              "steps (TRL: its steps minus the rollout); resp len: mean completion tokens (to EOS); "
              "resp tok/s: rows x resp len / iteration s; reward: mean arithmetic reward; compile s: "
              "our three programs' lower().compile(), before iteration 1")


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "(not installed)"


if __name__ == "__main__":
    main()
