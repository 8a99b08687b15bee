"""What jaxalign may write, delete and replace: ownership markers, the run lock, atomic
writes and whole-directory replacement of exports.

Rules (README "Safety and data"):
  - Every directory jaxalign creates for a run, a pipeline stage or an export carries
    `.jaxalign_owner.json` ({"by": "jaxalign", "kind": ...}). jaxalign writes into an
    existing non-empty directory, or deletes / replaces one, only when it carries that
    marker (or the marker of an earlier jaxalign version: run.json, jaxalign.json, a
    manifested checkpoints/ folder). Anything else is refused in one line naming the path;
    there is no flag to force it: move the directory away or choose another out_dir.
  - A run directory is locked (`flock` on `.jaxalign.lock`) for the life of the command
    writing it; a second command on it is refused, naming the holder's pid. The kernel drops
    the lock when the holder exits or is killed, so a SIGKILL leaves no stale lock.
  - An export is written into a temporary directory beside its destination and swapped in
    whole once complete: no shard or index of an earlier export survives, and a failure
    (a full disk) leaves the earlier export as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import jax

from jaxalign.config import JaxalignError

OWNER = ".jaxalign_owner.json"
LOCK = ".jaxalign.lock"
# What older jaxalign versions left in their directories (kept: their runs stay resumable).
_LEGACY = (("run.json", "jaxalign-run"), ("jaxalign.json", "jaxalign-model"))


class ForeignDirError(JaxalignError):
    """A directory jaxalign would write into, replace or delete holds files it did not write."""


class RunLockedError(JaxalignError):
    """Another process holds the run directory's lock."""


class DiskFullError(JaxalignError):
    """A write ran out of space (or hit a file-size limit); nothing earlier was replaced."""


def write_atomic(path: str | Path, text: str) -> None:
    """`text` into `path` so that a kill or a full disk leaves the old file or the new one,
    never half of one: a temporary file beside it, fsync, rename, fsync of the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> dict | None:
    """A JSON file jaxalign wrote, or None when it is missing, empty or torn (a kill or a
    full disk during a non-atomic write of an older version)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_owned(path: str | Path) -> bool:
    """Whether `path` is a directory jaxalign wrote (its marker, or an older version's)."""
    path = Path(path)
    if (path / OWNER).is_file():
        return True
    for name, fmt in _LEGACY:
        if (meta := read_json(path / name)) is not None and meta.get("format") == fmt:
            return True
        if name == "run.json" and (path / name).is_file() and (path / "checkpoints").is_dir():
            return True    # a torn run.json (issue: empty after a kill) in a real run dir
    if path.name == "hf" and path.parent != path and is_owned(path.parent):
        return True        # a run's or an export stage's own hf/ (written before markers)
    return (path / "checkpoints" / "jaxalign_checkpoints.json").is_file()


def is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def mark(path: str | Path, kind: str) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / OWNER).exists():
        write_atomic(path / OWNER, json.dumps({"by": "jaxalign", "kind": kind}) + "\n")


def refuse_foreign(path: str | Path, what: str) -> None:
    """Raises ForeignDirError unless `path` is absent, empty or jaxalign's."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ForeignDirError(f"{path}: is a file, not a directory; {what} needs a directory "
                              f"(choose another path)")
    if not is_empty(path) and not is_owned(path):
        raise ForeignDirError(f"{path}: exists, is not empty and was not written by jaxalign "
                              f"(no {OWNER}); {what} would overwrite it: move it away or choose "
                              f"another out_dir")


def claim(path: str | Path, kind: str) -> Path:
    """A directory for jaxalign to write into: absent, empty or already jaxalign's (else
    ForeignDirError); created and marked. Only process 0 checks and marks: another process
    of the same run could otherwise see the directory half-made (process 0's marker still a
    temp file in it) and refuse it; if process 0 refuses, the others stop at the run's first
    exchange (the peer watchdog names it)."""
    path = Path(path).expanduser()
    if jax.process_index() == 0:
        refuse_foreign(path, f"this {kind}")
        mark(path, kind)
    return path


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_apart(out: str | Path, other: str | Path | None, key: str, what: str = "out_dir") -> None:
    """Refuses `out` equal to, inside or containing the existing path `other` (key `key`):
    writing there would overwrite or delete the model a run reads."""
    if other is None or not Path(other).expanduser().exists():
        return      # a hub id, or nothing to protect
    o, m = Path(out).expanduser().resolve(), Path(other).expanduser().resolve()
    if _inside(o, m) or _inside(m, o):
        rel = "is" if o == m else ("is inside" if _inside(o, m) else "contains")
        raise ForeignDirError(f"{what} {out} {rel} {key} {other}: jaxalign would write over "
                              f"the model it reads; choose another {what}")


# ----------------------------------------------------------------------------- the run lock

@contextlib.contextmanager
def locked(path: str | Path):
    """Holds `path/.jaxalign.lock` (flock, exclusive) for the block; RunLockedError naming
    the holder's pid when another process has it. Process 0 only: the processes of one
    multi-process run share the directory."""
    if jax.process_index() != 0:
        yield
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(f"{path}: another jaxalign process (pid {holder}) is writing "
                                 f"this directory; wait for it to end or use another out_dir")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)     # releases the lock (the kernel does the same on SIGKILL)


# ----------------------------------------------------------------------------- exports

_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
         errno.EFBIG: "file too large (a file size limit)"}


def disk_full(e: BaseException) -> str | None:
    """Why `e` (or what caused it) is a full disk or a file-size limit; None if it is not.
    Orbax / tensorstore report it as a ValueError carrying the OS message."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL:
            return _FULL[e.errno]
        for why in _FULL.values():
            if why.split(" (")[0] in str(e).lower():
                return why
        e = e.__cause__ or e.__context__
    return None


def _closed_loop(value) -> bool:
    return isinstance(value, RuntimeError) and str(value) == "Event loop is closed"


def drop_closed_loop_noise() -> None:
    """After a failed orbax write, tensorstore's callbacks into orbax's closed event loop each
    print a `RuntimeError: Event loop is closed` traceback (as an unraisable exception) while
    the command reports the real error; those are dropped, anything else is printed as before."""
    previous = sys.unraisablehook
    if getattr(previous, "jaxalign_drops_closed_loop", False):
        return

    def hook(unraisable):
        if not _closed_loop(unraisable.exc_value):
            previous(unraisable)
    hook.jaxalign_drops_closed_loop = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_writer_threads():
    """Orbax's writer threads log each failed file with a traceback (absl ERROR) before the
    error reaches the caller, which reports it once; kept unless debug logging is on."""
    import logging
    names = ("absl", "asyncio")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    if not logging.getLogger("jaxalign").isEnabledFor(logging.DEBUG):
        drop_closed_loop_noise()       # they come from tensorstore's threads, mid-save
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def replacing(out: str | Path, kind: str, *, sources=()):
    """Yields a fresh directory to write an export (`kind`) into; when the block ends, it
    replaces `out` whole. Refuses (before anything is written) an `out` that is a foreign
    non-empty directory, or that is, holds or lies inside one of `sources` (the model being
    read). A failure removes the partial copy and leaves `out` as it was; a full disk is one
    DiskFullError naming the path. Every process gets the same temporary path; process 0
    creates, marks and swaps it."""
    out = Path(out).expanduser().absolute()
    for src in sources:
        check_apart(out, src, "the source model", what="the export directory")
    refuse_foreign(out, f"writing a {kind}")
    tmp = out.with_name(f".{out.name}.jaxalign-partial")
    writer = jax.process_index() == 0
    if writer:
        if tmp.exists():       # a partial copy an earlier, killed export left: ours by name
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    try:
        if writer:
            mark(tmp, kind)
        yield tmp
    except BaseException as e:
        if writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if why := disk_full(e):
            raise DiskFullError(f"{out}: writing the {kind} failed: {why}; nothing was "
                                f"replaced; free space and run it again") from None
        raise
    if not writer:
        return
    old = out.with_name(f".{out.name}.jaxalign-old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
