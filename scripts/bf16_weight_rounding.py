"""Where does a bf16 run's loss part from fp32's: the matmuls' rounding, or the weights'?

Trains SmolLM2-135M for a few steps (full SFT, Adam at a small constant lr, the same batches
of the repo's synthetic task text in every variant) five ways and prints each one's train
losses and the held-out loss of its fp32 weights, read both in fp32 and as its forward
reads them:

    fp32            fp32 forward and weights
    bf16_nearest    bf16 matmuls, weights rounded to nearest (`train.stochastic_rounding=false`)
    fp32_nearest    fp32 matmuls reading the weights rounded to nearest bf16
    fp32_stochastic fp32 matmuls reading the weights rounded stochastically to bf16
    bf16_stochastic bf16 matmuls, weights rounded stochastically (the default)

When fp32_nearest follows bf16_nearest and fp32_stochastic follows fp32, the gap is the
weights' rounding, not the matmuls'. The step is this script's own (forward, loss, Adam with
clipping as `jaxalign.train.optim` builds it), so that each variant changes one thing.

    python scripts/bf16_weight_rounding.py [--steps 8] [--lr 2e-5] [--variants a,b,...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

VARIANTS = {   # name: (compute dtype, how the forward reads the fp32 weights)
    "fp32": ("float32", "exact"),
    "bf16_nearest": ("bfloat16", "exact"),   # the model casts them itself: to nearest
    "fp32_nearest": ("float32", "nearest"),
    "fp32_stochastic": ("float32", "stochastic"),
    "bf16_stochastic": ("bfloat16", "stochastic"),
}


def token_batches(tokenizer, batch: int, seq: int, count: int):
    import numpy as np
    from jaxalign.synth import tasks
    d = Path(tempfile.mkdtemp(prefix="bf16_rounding_"))
    n = batch * (seq + 1)
    tasks.write_splits(d, max(200, n * count // 15), 8)   # ~40 tokens a row
    ids: list[int] = []
    for line in (d / "train.jsonl").read_text().splitlines():
        text = "\n".join(m["content"] for m in json.loads(line)["messages"])
        ids += tokenizer(text + tokenizer.eos_token)["input_ids"]
    if len(ids) < n * count:
        raise SystemExit(f"only {len(ids)} tokens of task text for {count} batches of {n}")
    arr = np.asarray(ids[: n * count]).reshape(count, batch, seq + 1)
    return list(arr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", type=Path, default=None, help="an HF dir (default: SmolLM2 cache)")
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    from transformers import AutoTokenizer

    from fetch_smollm2 import fetch
    from jaxalign.config import OptimConfig
    from jaxalign.convert import hf
    from jaxalign.losses.xent import head_masked_xent
    from jaxalign.models import functional
    from jaxalign.precision import round_params
    from jaxalign.train.optim import make_optimizer

    path = args.model or fetch()
    cfg, params0, _ = hf.load(path)
    batches = [jnp.asarray(b) for b in token_batches(AutoTokenizer.from_pretrained(str(path)),
                                                     args.batch, args.seq, args.steps + 1)]
    optimizer, _ = make_optimizer(OptimConfig(lr=args.lr, schedule="constant"), args.steps)

    def loss(params, c, tokens):
        _, hidden, _ = functional.apply(c, params, tokens[:, :-1], return_logits=False)
        head, head_is_VD = functional.lm_head(c, params)
        targets = tokens[:, 1:]
        return head_masked_xent(hidden, head, targets, jnp.ones_like(targets),
                                head_is_VD=head_is_VD)[0]

    def read(params, how, seed):
        if how == "nearest":   # the weights `round_params` rounds (not the norm scales)
            return jax.tree_util.tree_map_with_path(
                lambda path, a: a if "norm" in jax.tree_util.keystr(path)
                else a.astype(jnp.bfloat16).astype(jnp.float32), params)
        return round_params(params, seed) if how == "stochastic" else params

    c32 = cfg.replace(dtype="float32")
    held_fp32 = jax.jit(lambda q, t: loss(q, c32, t))
    print(f"SmolLM2 full SFT, {args.steps} steps of {args.batch} x {args.seq} tokens, lr {args.lr} "
          f"constant (Adam, clip 1.0); held-out: one more batch")
    print(f"{'variant':16s} {'train losses':>{9 * args.steps}s}  held-out: fp32 read / as read")
    for name in args.variants.split(","):
        dtype, how = VARIANTS[name]
        c = cfg.replace(dtype=dtype)

        @jax.jit
        def step(q, s, tokens, seed):
            value, grads = jax.value_and_grad(lambda r: loss(r, c, tokens))(read(q, how, seed))
            updates, s = optimizer.update(grads, s, q)
            return jax.tree.map(lambda a, u: a + u, q, updates), s, value

        q, s, losses = params0, optimizer.init(params0), []
        for i in range(args.steps):
            q, s, value = step(q, s, batches[i], jnp.uint32(i))
            losses.append(float(value))
        as_read = float(jax.jit(lambda r, t: loss(read(r, how, jnp.uint32(999)), c, t))(q, batches[-1]))
        print(f"{name:16s} " + " ".join(f"{x:8.4f}" for x in losses)
              + f"  {float(held_fp32(q, batches[-1])):.4f} / {as_read:.4f}", flush=True)


if __name__ == "__main__":
    main()
