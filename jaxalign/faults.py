"""Fault points: named places in the training loops where a test or `scripts/faults.py` can
make the process receive a signal, to check that a run survives being killed or preempted
exactly there.

    JAXALIGN_FAULT="NAME:N[:DELAY_S[:SIGNAL]]"

At the N-th time this process reaches the point NAME, it sends itself SIGNAL (default KILL),
after DELAY_S seconds (default 0: at once; a delay lets the signal land inside the work that
follows the point, e.g. an orbax write). Unset (the normal case), `point` is a dict lookup.

The points:
  batch       a training batch (supervised) or the prompts (RL) were just fetched
  step        an optimizer step was dispatched and is still running
  checkpoint  a checkpoint write starts (orbax files not yet written, no manifest)
  manifest    the orbax files are written, the integrity manifest is not
  rollout     an RL rollout was dispatched and is still running
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "JAXALIGN_FAULT"
POINTS = ("batch", "step", "checkpoint", "manifest", "rollout")

_spec: tuple[str, int, float, int] | None | bool = False   # False: not parsed yet
_hits: dict[str, int] = {}


def parse(text: str) -> tuple[str, int, float, int]:
    """'NAME:N[:DELAY_S[:SIGNAL]]' -> (name, n, delay, signal number); ValueError if bad."""
    parts = text.strip().split(":")
    if not 2 <= len(parts) <= 4 or parts[0] not in POINTS:
        raise ValueError(f"{ENV}={text!r}: expected NAME:N[:DELAY_S[:SIGNAL]] with NAME one "
                         f"of {', '.join(POINTS)}")
    n = int(parts[1])
    delay = float(parts[2]) if len(parts) > 2 else 0.0
    sig = signal.Signals["SIG" + parts[3].upper().removeprefix("SIG")] if len(parts) > 3 \
        else signal.SIGKILL
    if n < 1 or delay < 0:
        raise ValueError(f"{ENV}={text!r}: N must be >= 1 and DELAY_S >= 0")
    return parts[0], n, delay, int(sig)


def _active():
    global _spec
    if _spec is False:
        text = os.environ.get(ENV, "").strip()
        _spec = parse(text) if text else None
    return _spec


def point(name: str) -> None:
    """Marks fault point `name` (one of POINTS); fires the configured signal on its N-th hit."""
    spec = _active()
    if spec is None or spec[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != spec[1]:
        return
    _, _, delay, sig = spec
    if delay:
        timer = threading.Timer(delay, os.kill, (os.getpid(), sig))
        timer.daemon = True
        timer.start()
    else:
        os.kill(os.getpid(), sig)


def reset() -> None:
    """Forget the hit counts and read JAXALIGN_FAULT again (tests change it in-process)."""
    global _spec
    _spec = False
    _hits.clear()
