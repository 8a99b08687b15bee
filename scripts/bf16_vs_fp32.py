"""Does bf16 training track fp32 on the real model? One short SmolLM2-135M full SFT, run twice
through the CLI (what users get) on the same data, data order and seed, once with
`model.dtype=float32` and once with `model.dtype=bfloat16` (fp32 master weights and optimizer,
bf16 matmuls with fp32 accumulation, fp32 loss).

So that the comparison measures precision and not batch noise, every token is trained
(`data.train_on_prompt=true`: the prompts' numbers, names and years keep the loss well above 0,
where answer tokens alone are learned within ~10 steps and leave a near-zero, noisy loss), rows
are packed full, and the final figures are not one batch: the held-out eval loss on a fixed eval
set after the last step, and the mean of the last 5 train losses. The maximum per-step relative
gap of the train loss (same batch at every step in both runs) is printed beside them.

    python scripts/bf16_vs_fp32.py [--steps 50] [--batch 4] [--seq 128] [--out DIR] [--side both]

`--side theirs` (or both) runs the same comparison through TRL 1.16's SFTTrainer, bf16 autocast
(its default) against `bf16=False`, on the very rows the CLI trains on (its packed batches,
each row taken whole as input_ids with labels = input_ids) and the CLI's held-out rows: the
gap PyTorch users accept for bf16 at the same lr, beside ours. Writes DIR/{fp32,bf16}/ (runs)
and prints the comparison; docs/bench/ keeps one output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

PRECISIONS = ("float32", "bfloat16")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_one(model: Path, data: Path, out: Path, dtype: str, args) -> tuple[list[dict], float]:
    """Runs `jaxalign sft` once; returns its metrics.jsonl rows and the wall time."""
    cmd = [sys.executable, "-m", "jaxalign.cli", "sft", str(ROOT / "configs/smollm2_sft.yaml"),
           *cli_args(model, data, out, dtype, args)]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return rows, time.time() - t0


def cli_args(model: Path, data: Path, out: Path, dtype: str, args) -> list[str]:
    """The overrides of configs/smollm2_sft.yaml every run shares (one place for both sides)."""
    return [f"out_dir={out}", f"model.path={model}", f"model.dtype={dtype}", "lora.rank=0",
            f"data.train=[{{path: {data / 'train.jsonl'}}}]",
            f"data.eval=[{{path: {data / 'eval.jsonl'}}}]",
            "data.eval_fraction=0", f"data.seq_len={args.seq}", "data.pack=true",
            "data.train_on_prompt=true", f"train.steps={args.steps}",
            f"train.batch_size={args.batch}", "train.log_every=1", "train.eval_every=0",
            "train.save_every=0", "train.save_every_minutes=0", "train.export_hf=false",
            "train.progress=false", f"optim.lr={args.lr}", "optim.schedule=constant",
            "optim.warmup_steps=0"]


def cli_rows(model: Path, data: Path, args) -> tuple[list[list[int]], list[list[int]]]:
    """(train rows in the order the CLI trains on them, held-out rows): each packed row's
    tokens, padding dropped."""
    import numpy as np
    from jaxalign.configfile import load_yaml
    from jaxalign.data.pipeline import build_sft_data
    from jaxalign.tokenizer import load_tokenizer
    from jaxalign.train.sft import SFTConfig
    cfg = load_yaml(str(ROOT / "configs/smollm2_sft.yaml"),
                    cli_args(model, data, Path("unused"), "float32", args), SFTConfig)
    built = build_sft_data(cfg.data, load_tokenizer(cfg.model.path), batch_size=args.batch)
    rows = lambda b: [t[s > 0].tolist() for t, s in zip(np.asarray(b["tokens"]),
                                                          np.asarray(b["segment_ids"]))]
    train = [r for _ in range(args.steps) for r in rows(next(built.train))]
    held = [r for b in built.eval for r in rows(b)]
    return train, held


def run_trl(model: Path, train: list, held: list, out: Path, dtype: str, args) -> tuple[list[dict], float]:
    """TRL's SFTTrainer on the CLI's rows: its defaults but batch, steps, lr (constant, no
    warmup), precision; sequential order; the held-out loss at the end."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    t0 = time.time()
    cfg = SFTConfig(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                    per_device_eval_batch_size=args.batch, learning_rate=args.lr,
                    lr_scheduler_type="constant", warmup_steps=0, bf16=dtype == "bfloat16",
                    use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
                    logging_steps=1, max_length=args.seq, train_sampling_strategy="sequential",
                    dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=str(model), args=cfg,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": train}),
                         eval_dataset=datasets.Dataset.from_dict({"input_ids": held}),
                         processing_class=AutoTokenizer.from_pretrained(str(model)))
    trainer.train()
    rows = [{"step": l["step"], "loss": l["loss"]} for l in trainer.state.log_history if "loss" in l]
    rows.append({"step": args.steps, "eval/loss": trainer.evaluate()["eval_loss"]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows, time.time() - t0


def _verdict(name: str, fp: float, bf: float) -> str:
    rel = abs(bf - fp) / abs(fp)
    return (f"{name}: fp32 {fp:.4f}, bf16 {bf:.4f}: {rel:.2%} apart, "
            f"{'within' if rel <= 0.01 else 'NOT within'} 1%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--eval", type=int, default=200, help="held-out eval examples")
    p.add_argument("--parallel", action="store_true", help="run both precisions at once")
    p.add_argument("--report", action="store_true",
                   help="run nothing: compare the runs already in --out (finished or not)")
    p.add_argument("--model", type=Path, default=None, help="an HF dir (default: SmolLM2 cache)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--side", choices=("ours", "theirs", "both"), default="ours",
                   help="jaxalign's CLI, TRL's SFTTrainer (same rows), or both")
    args = p.parse_args()

    from fetch_smollm2 import fetch
    from jaxalign.synth import tasks
    model = args.model or fetch()
    out = args.out or Path(tempfile.mkdtemp(prefix="bf16_vs_fp32_"))
    data = out / "data"
    if not args.report:
        tasks.write_splits(data, 2000, args.eval)

    sides = ("ours", "theirs") if args.side == "both" else (args.side,)
    if "theirs" in sides and not args.report:
        train, held = cli_rows(model, data, args)
    for side in sides:
        where = out if side == "ours" else out / "trl"
        if args.report:
            results = {d: ([json.loads(l) for l in (where / d / "metrics.jsonl").read_text().splitlines()
                            if l.strip()], float("nan")) for d in PRECISIONS}
        elif side == "theirs":   # one at a time: torch takes every core
            results = {d: run_trl(model, train, held, where / d, d, args) for d in PRECISIONS}
        elif args.parallel:   # on a shared machine: both runs see the same contention
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(2) as pool:
                futs = {d: pool.submit(run_one, model, data, out / d, d, args) for d in PRECISIONS}
                results = {d: f.result() for d, f in futs.items()}
        else:
            results = {d: run_one(model, data, out / d, d, args) for d in PRECISIONS}
        report(side, results, args)


def report(side: str, results: dict, args) -> None:
    curves, walls, finals = {}, {}, {}
    for dtype, (rows, wall) in results.items():
        curves[dtype] = [r for r in rows if "loss" in r]
        finals[dtype] = next((r["eval/loss"] for r in reversed(rows) if "eval/loss" in r), None)
        walls[dtype] = wall

    n = min(len(curves["float32"]), len(curves["bfloat16"]))
    fp, bf = curves["float32"][:n], curves["bfloat16"][:n]   # the common steps of unfinished runs
    who = ("jaxalign CLI (model.dtype)" if side == "ours" else
           "TRL 1.16 SFTTrainer (bf16=True autocast vs bf16=False), on the CLI's rows")
    print(f"\n{who}: SmolLM2-135M full SFT, {args.steps} steps of {args.batch} x {args.seq} tokens "
          f"(packed, loss on every token), lr {args.lr} constant, same data order and seed; eval: "
          f"{args.eval} held-out examples; machine: {_cpu_name()}, {os.cpu_count()} cores")
    print(f"{'step':>4} {'fp32 loss':>10} {'bf16 loss':>10} {'rel diff':>9}")
    gaps = []
    for a, b in zip(fp, bf):
        gaps.append((b["loss"] - a["loss"]) / a["loss"])
        print(f"{a['step']:4d} {a['loss']:10.4f} {b['loss']:10.4f} {gaps[-1]:+9.2%}")
    tail = lambda rows: sum(r["loss"] for r in rows[-5:]) / len(rows[-5:])
    if None in finals.values():
        print(f"held-out eval loss: not reached (runs at step {fp[-1]['step']} of {args.steps})")
    else:
        print(_verdict(f"held-out eval loss after step {fp[-1]['step']}",
                       finals["float32"], finals["bfloat16"]))
    print(_verdict("mean train loss of the last 5 steps", tail(fp), tail(bf)))
    worst = max(range(len(gaps)), key=lambda i: abs(gaps[i]))
    print(f"max per-step relative gap of the train loss: {gaps[worst]:+.2%} (step {fp[worst]['step']}); "
          f"mean |gap| {sum(map(abs, gaps)) / len(gaps):.2%}")
    print(f"train loss from {fp[0]['loss']:.4f} (step 1) -> fp32 {fp[-1]['loss']:.4f}, "
          f"bf16 {bf[-1]['loss']:.4f}")
    if not args.report:
        print(f"wall time of each run (compile and eval included): fp32 {walls['float32']:.0f} s, "
              f"bf16 {walls['bfloat16']:.0f} s")


if __name__ == "__main__":
    main()
