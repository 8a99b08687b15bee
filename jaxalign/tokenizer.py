"""Tokenizer loading without torch.

In transformers 5, `AutoTokenizer` imports torch; `PreTrainedTokenizerFast` reads the same
tokenizer.json, special tokens and chat template without it. jaxalign never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from jaxalign.config import JaxalignError


def load_tokenizer(path: str | Path):
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise JaxalignError(f"{path}: no tokenizer.json (jaxalign reads fast tokenizers; convert a "
                            "slow one with transformers' AutoTokenizer(...).save_pretrained)")
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # pad == eos: masks, not ids, decide what is trained
    return tok
