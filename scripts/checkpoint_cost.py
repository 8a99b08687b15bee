"""What the checkpoint integrity manifest costs at save time, on SmolLM2-135M-sized state.

  python scripts/checkpoint_cost.py [--repeats 3] [--dir DIR]

Builds the TrainState a full fine-tune of SmolLM2-135M checkpoints (the real fp32 params,
AdamW moments of the same shapes filled with noise so nothing compresses), saves it with
`TrainCheckpoints.save` `--repeats` times, and reports the median time of the whole save
and of the manifest part (listing + CRC-32 of every file + atomic write), in seconds and as
a share of the save. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args(argv)

    import jax
    import optax
    from fetch_smollm2 import fetch
    from jaxalign import manifest
    from jaxalign.checkpoint import TrainCheckpoints
    from jaxalign.convert import hf
    from jaxalign.train.step import init_state

    _, params, _ = hf.load(fetch())
    state = jax.jit(init_state, static_argnums=(1, 2))(params, optax.adamw(1e-5), 0)
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 10_000))
    state = state.__class__(step=state.step, params=state.params, rng=state.rng,
                            opt_state=jax.tree.map(
                                lambda x: jax.random.normal(next(keys), x.shape, x.dtype)
                                if x.ndim else x, state.opt_state))
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    root = Path(tempfile.mkdtemp(dir=args.dir))
    timed = {"write": manifest.write}
    spent: list[float] = []

    def write(step_dir):           # the manifest part of TrainCheckpoints.save, timed
        t = time.perf_counter()
        out = timed["write"](step_dir)
        spent.append(time.perf_counter() - t)
        return out

    manifest.write = write
    totals = []
    try:
        ckpts = TrainCheckpoints(root / "run", keep=1)
        for step in range(1, args.repeats + 1):
            t = time.perf_counter()
            ckpts.save(step, state, {"step": step})
            totals.append(time.perf_counter() - t)
        ckpts.close()
    finally:
        manifest.write = timed["write"]
        shutil.rmtree(root, ignore_errors=True)
    save, man = statistics.median(totals), statistics.median(spent)
    out = {"state_bytes": nbytes, "save_s": round(save, 3), "manifest_s": round(man, 3),
           "manifest_share": round(man / save, 4), "repeats": args.repeats}
    print(f"TrainState {nbytes / 2**30:.2f} GiB: save {save:.2f} s (median of {args.repeats}), "
          f"of which the manifest {man:.3f} s ({100 * man / save:.1f}%)", file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
