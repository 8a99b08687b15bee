"""RL memory as the user sees it: the process's resident set (RSS) per phase of an iteration,
and the allocator's free memory handed back to the system between the rollout and the update.

Per phase (load: everything before the programs compile, peak since the process started;
compile; then per iteration rollout, scoring, update, eval) perf.jsonl gets `rss_<phase>_gib` (resident at the
phase's end) and `rss_peak_<phase>_gib` (the high-water mark within the phase: Linux resets
VmHWM when 5 is written to /proc/self/clear_refs; where that is refused, the peak since the
process started). `rss_released_gib`: what handing the allocator's free pages back returned.

Why release: the rollout's temporaries (KV cache, sampler state, the scoring forwards'
activations) are freed by XLA into the C allocator, which keeps them (mimalloc with purging
off, as jaxalign's CLI runs it, by design: reusing mapped pages is what makes the steps fast;
glibc keeps arenas' tops too). The update then allocates differently shaped buffers on top,
so the process peak becomes the two phases' high-water marks stacked. Handing the free pages
back once per iteration (mimalloc's `mi_collect(true)`, glibc's `malloc_trim(0)`) costs
milliseconds and lets the update's peak start from what is really live.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

log = logging.getLogger(__name__)

_GIB = float(2 ** 30)


def _status() -> dict[str, float]:
    """VmRSS / VmHWM of this process in GiB (empty where /proc is missing)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0]) * 1024 / _GIB
    except OSError:
        pass
    return out


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _collector():
    """The allocator's 'return free memory' call: mimalloc's when it is preloaded, else
    glibc's malloc_trim; None when neither is found."""
    try:
        process = ctypes.CDLL(None)
    except OSError:
        return None
    for name, args in (("mi_collect", (ctypes.c_bool(True),)), ("malloc_trim", (0,))):
        fn = getattr(process, name, None)
        if fn is not None:
            return lambda fn=fn, args=args: fn(*args)
    return None


class PhaseMemory:
    """Marks phase boundaries; `take()` hands the figures since the last call to perf."""

    def __init__(self):
        self.fields: dict[str, float] = {}
        self.collect = _collector()

    def start(self) -> None:
        _reset_peak()

    def end(self, phase: str) -> None:
        s = _status()
        if "VmRSS" in s:
            self.fields[f"rss_{phase}_gib"] = round(s["VmRSS"], 4)
            self.fields[f"rss_peak_{phase}_gib"] = round(s["VmHWM"], 4)
        self.start()

    def release(self) -> None:
        """The allocator's free pages back to the system (between rollout and update)."""
        if self.collect is None:
            return
        before = _status().get("VmRSS")
        self.collect()
        after = _status().get("VmRSS")
        if before is not None and after is not None:
            self.fields["rss_released_gib"] = round(before - after, 4)

    def take(self) -> dict[str, float]:
        out, self.fields = self.fields, {}
        return out
