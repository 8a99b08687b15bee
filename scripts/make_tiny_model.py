"""A tiny random Llama + a tiny BPE tokenizer with a ChatML template, as an HF directory.

  python scripts/make_tiny_model.py OUT_DIR [--layers 2] [--hidden 64] [--seed 0]

For smoke runs and fast tests: built by jaxalign itself (random init + HF export) and the
`tokenizers` library, so it needs neither torch nor a hub. A 384-token vocabulary keeps the
logits small; `tokenizer_dir` uses another tokenizer (e.g. SmolLM2's) instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer(out: str | Path, vocab_size: int = 384):
    """Byte-level BPE trained on a small fixed corpus (deterministic); ids 0-2 are specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("what is plus minus times the answer write a list of three colors red green blue "
             "system user assistant you are helpful reply with only number sentence about sea "
             "yes no please format json key value extract name from text").split()
    corpus = [f"What is {a} plus {b}? The answer is {a + b}." for a in range(30) for b in range(30)]
    corpus += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], pad_token=SPECIALS[2])
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    return fast


def make_tiny_model(out: str | Path, tokenizer_dir: str | Path | None = None, *, layers: int = 2,
                    hidden: int = 64, heads: int = 4, kv_heads: int = 2, seed: int = 0) -> Path:
    from jaxalign.config import ModelConfig
    from jaxalign.convert import hf
    from jaxalign.models import functional
    from jaxalign.tokenizer import load_tokenizer

    import tempfile
    out = Path(out)
    if tokenizer_dir is None:
        # Beside `out`, not in it: hf.save replaces its output directory whole.
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            make_tiny_tokenizer(tmp)
            return make_tiny_model(out, tmp, layers=layers, hidden=hidden, heads=heads,
                                   kv_heads=kv_heads, seed=seed)
    tok = load_tokenizer(tokenizer_dir)
    vocab = -(-len(tok) // 64) * 64  # round up: spare rows are harmless, shapes stay tidy
    cfg = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                      head_dim=hidden // heads, rope_theta=10000.0, max_position_embeddings=2048,
                      tie_word_embeddings=True)
    hf_config = hf.hf_config_for(cfg)
    hf_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
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
