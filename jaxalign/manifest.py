"""Integrity manifests of training checkpoints: what lets a resume tell a complete
checkpoint from one whose write was cut (a kill, a full disk, a node lost mid-write).

Orbax writes a step into a temporary directory and renames it when done, so a kill during
the write leaves no step directory. That is not enough: the rename can reach the disk before
the data (a crash after a rename that was not synced), a copy between machines can stop
half-way, a file can be truncated later. So after orbax finished, every checkpoint gets a
manifest, written last and atomically (a temporary file, fsync, rename):

  checkpoints/<step>/jaxalign_manifest.json   {"version": 1, "files": {path: [size, crc32]}}

A step without it, or whose files differ from it in size or CRC-32, is incomplete and never
restored. CRC-32 because it detects truncation and bit rot at ~4 GB/s (zlib), several
times faster than a cryptographic hash; nothing here defends against a deliberate forgery.

A checkpoints directory made by this code carries `jaxalign_checkpoints.json`
({"manifests": 1}); in one without it (written before manifests existed) a step is trusted
as orbax finalised it, with a warning.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

from jaxalign.rundir import write_atomic

MANIFEST = "jaxalign_manifest.json"
DIR_MARKER = "jaxalign_checkpoints.json"
_CHUNK = 16 * 2**20


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)



def write(step_dir: Path) -> dict:
    """Manifest of every file under `step_dir` (call once orbax has finished the step)."""
    files = {str(p.relative_to(step_dir)): [p.stat().st_size, _crc32(p)] for p in _files(step_dir)}
    manifest = {"version": 1, "files": files}
    write_atomic(step_dir / MANIFEST, json.dumps(manifest, sort_keys=True) + "\n")
    return manifest


def problem(step_dir: Path) -> str | None:
    """Why the step in `step_dir` is not a complete checkpoint, or None if it is."""
    path = step_dir / MANIFEST
    if not path.exists():
        return "no integrity manifest (its write did not finish)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for rel, (size, crc) in sorted(files.items()):
        p = step_dir / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {size} (truncated)"
    for rel, (_, crc) in sorted(files.items()):
        if _crc32(step_dir / rel) != crc:
            return f"{rel} fails its CRC-32 check (corrupted)"
    return None


def mark_dir(ckpt_dir: Path) -> None:
    """Declares `ckpt_dir` a directory whose steps all carry manifests."""
    marker = ckpt_dir / DIR_MARKER
    if not marker.exists():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps({"manifests": 1}) + "\n")


def requires_manifests(ckpt_dir: Path) -> bool:
    return (ckpt_dir / DIR_MARKER).exists()
