"""Does bf16 training track fp32 on the real model? One short SmolLM2-135M full SFT, run twice
through the CLI on the same data and seed, once with `--dtype float32` and once with
`--dtype bfloat16` (fp32 master weights and optimizer, bf16 matmuls with fp32 accumulation):
prints both loss curves, their step times and whether the final loss of bf16 is within 1% of
fp32's (the last step, and the mean of the last 10 steps, which is less noisy).

    python scripts/bf16_vs_fp32.py [--steps 50] [--batch 4] [--seq 128] [--out DIR]

Writes DIR/{fp32,bf16}/ (runs) and prints the comparison; docs/bench/ keeps one output.
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
    cmd = [sys.executable, "-m", "jaxalign.cli", "sft", str(ROOT / "configs/smollm2_sft.yaml"),
           f"out_dir={out}", f"model.path={model}", f"model.dtype={dtype}", "lora.rank=0",
           f"data.train=[{{path: {data}}}]", "data.eval_fraction=0", f"data.seq_len={args.seq}",
           f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.log_every=1",
           "train.eval_every=0", "train.save_every=0", "train.export_hf=false",
           f"optim.lr={args.lr}", "optim.schedule=constant", "optim.warmup_steps=0"]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r for r in rows if "loss" in r], time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--model", type=Path, default=None, help="an HF dir (default: SmolLM2 cache)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from fetch_smollm2 import fetch
    from jaxalign.synth import tasks
    model = args.model or fetch()
    out = args.out or Path(tempfile.mkdtemp(prefix="bf16_vs_fp32_"))
    tasks.write_splits(out / "data", 2000, 0)
    data = out / "data/train.jsonl"

    curves, walls = {}, {}
    for dtype in PRECISIONS:
        curves[dtype], walls[dtype] = run_one(model, data, out / dtype, dtype, args)

    fp, bf = curves["float32"], curves["bfloat16"]
    print(f"\nSmolLM2-135M full SFT, {args.steps} steps of {args.batch} x {args.seq} tokens, "
          f"lr {args.lr} constant, same data and seed; machine: {_cpu_name()}, "
          f"{os.cpu_count()} cores")
    print(f"{'step':>4} {'fp32 loss':>10} {'bf16 loss':>10} {'rel diff':>9}")
    for a, b in zip(fp, bf):
        print(f"{a['step']:4d} {a['loss']:10.4f} {b['loss']:10.4f} {(b['loss'] - a['loss']) / a['loss']:+9.2%}")
    last = lambda rows: rows[-1]["loss"]
    tail = lambda rows: sum(r["loss"] for r in rows[-10:]) / len(rows[-10:])
    rel_last = abs(last(bf) - last(fp)) / last(fp)
    rel_tail = abs(tail(bf) - tail(fp)) / tail(fp)
    print(f"final loss: fp32 {last(fp):.4f}, bf16 {last(bf):.4f}: {rel_last:.2%} apart, "
          f"{'within' if rel_last <= 0.01 else 'NOT within'} 1%")
    print(f"mean of the last 10 steps: fp32 {tail(fp):.4f}, bf16 {tail(bf):.4f}: {rel_tail:.2%} "
          f"apart, {'within' if rel_tail <= 0.01 else 'NOT within'} 1%")
    print(f"loss from {fp[0]['loss']:.4f} -> fp32 {last(fp):.4f}, bf16 {last(bf):.4f}")
    print(f"wall time of each run (compile included): fp32 {walls['float32']:.0f} s, "
          f"bf16 {walls['bfloat16']:.0f} s")


if __name__ == "__main__":
    main()
