"""Forward and generation speed, jaxalign vs transformers, on SmolLM2-135M, in one process.

  python scripts/bench_forward.py [--batch 8] [--seq 256] [--new-tokens 128] [--allocator jemalloc]

Forward: compile time and tokens/s of one fp32 forward pass (logits for every position)
with layers scanned and unrolled, vs transformers' eager forward on the same tokens.
Generation: greedy decoding tokens/s at batch 1 and 8 with a KV cache, vs transformers
`generate` (same prompt, same number of new tokens: EOS is ignored on both sides).
"""

from __future__ import annotations

import argparse
import time

import benchlib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF dir (default: the cached SmolLM2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    benchlib.add_allocator_arg(ap)
    args = ap.parse_args()
    allocator = benchlib.ensure_allocator(args.allocator)

    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from fetch_smollm2 import fetch
    from jaxalign.convert import hf
    from jaxalign.generate import make_generate_fn
    from jaxalign.models import functional

    path = args.model or fetch()
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, ref.config.vocab_size, (args.batch, args.seq), dtype=np.int32)
    n_tok = tokens.size
    print(f"SmolLM2-135M fp32, {jax.default_backend()} ({jax.device_count()} device), "
          f"{torch.get_num_threads()} torch threads, allocator {allocator}")

    rows = []
    for scan in (True, False):
        cfg, params, _ = hf.load(path, scan_layers=scan)
        fwd = jax.jit(lambda p, t, c=cfg: functional.apply(c, p, t)[0])
        t0 = time.perf_counter()
        compiled = fwd.lower(params, tokens).compile()
        compile_s = time.perf_counter() - t0
        sec = benchlib.timeit(lambda: compiled(params, tokens).block_until_ready(), args.repeats)
        rows.append([f"jaxalign ({'scanned' if scan else 'unrolled'})", compile_s, sec, n_tok / sec])
        del params
    with torch.inference_mode():
        x = torch.from_numpy(tokens.astype(np.int64))
        sec = benchlib.timeit(lambda: ref(x).logits, args.repeats)
    rows.append(["transformers (eager)", "-", sec, n_tok / sec])
    torch_fwd = n_tok / sec
    benchlib.print_table(f"Forward, batch {args.batch} x {args.seq} tokens",
                         ["impl", "compile s", "step s", "tok/s"], rows)
    print(f"best jaxalign / transformers: {max(r[3] for r in rows[:2]) / torch_fwd:.2f}x")

    # Decoding is memory-bound: scanned layers decode faster than unrolled ones on CPU.
    cfg, params, _ = hf.load(path, scan_layers=True)
    rows = []
    for b in (int(s) for s in args.gen_batches.split(",")):
        prompt = tokens[:b, :args.prompt_len]
        mask = np.ones_like(prompt)
        gen = make_generate_fn(cfg, max_new_tokens=args.new_tokens, eos_ids=())
        key = jax.random.key(0)
        t0 = time.perf_counter()
        jax.block_until_ready(gen(params, prompt, mask, key))
        first = time.perf_counter() - t0
        sec = benchlib.timeit(lambda: jax.block_until_ready(gen(params, prompt, mask, key)),
                              args.repeats, warmup=0)
        ours = b * args.new_tokens / sec
        with torch.inference_mode():
            x = torch.from_numpy(prompt.astype(np.int64))
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                      do_sample=False, pad_token_id=ref.config.pad_token_id)
            sec_t = benchlib.timeit(lambda: ref.generate(x, attention_mask=torch.ones_like(x), **kw),
                                    args.repeats)
        theirs = b * args.new_tokens / sec_t
        rows.append([b, first, ours, theirs, ours / theirs])
    benchlib.print_table(
        f"Greedy generation, {args.prompt_len}-token prompt + {args.new_tokens} new tokens",
        ["batch", "jaxalign compile+1st s", "jaxalign tok/s", "transformers tok/s", "speedup"], rows)
    print(f"peak RSS {benchlib.peak_rss_gib():.1f} GiB")


if __name__ == "__main__":
    main()
