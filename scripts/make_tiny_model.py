"""A tiny random Llama with SmolLM2's tokenizer, as an HF directory, for smoke runs and tests.

  python scripts/make_tiny_model.py OUT_DIR [--layers 2] [--hidden 64] [--seed 0]

Built by jaxalign itself (random init + HF export), so it needs no torch. The vocabulary
is SmolLM2's (49152), so the real chat template and tokenizer apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def make_tiny_model(out: str | Path, tokenizer_dir: str | Path | None = None, *, layers: int = 2,
                    hidden: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    import json

    from fetch_smollm2 import fetch
    from jaxalign.config import ModelConfig
    from jaxalign.convert import hf
    from jaxalign.models import functional

    tokenizer_dir = Path(tokenizer_dir or fetch())
    base = json.loads((tokenizer_dir / "config.json").read_text())
    cfg = ModelConfig(vocab_size=base["vocab_size"], hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                      head_dim=hidden // heads, rope_theta=10000.0, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    hf_config = hf.hf_config_for(cfg)
    hf_config.update({k: base[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in base})
    params = functional.init_params(cfg, seed=seed)
    return hf.save(out, cfg, params, hf_config=hf_config, source_dir=tokenizer_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_tiny_model(args.out, layers=args.layers, hidden=args.hidden, seed=args.seed))


if __name__ == "__main__":
    main()
