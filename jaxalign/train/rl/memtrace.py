"""RL memory as the user sees it: the process's resident set (RSS) per phase of an iteration,
and the allocator's free memory handed back to the system once the programs are compiled.

Per phase (load: everything before the programs compile, peak since the process started;
compile; then per iteration rollout, scoring, update, eval) perf.jsonl gets
`rss_<phase>_gib` (resident at the phase's end) and `rss_peak_<phase>_gib` (the high-water
mark within the phase: Linux resets VmHWM when 5 is written to /proc/self/clear_refs; where
that is refused, the peak since the process started). `rss_released_gib`: what handing the
allocator's free pages back returned (`runtime.release_free_memory`).

Where it releases: after compiling (the loaders' and the compiler's temporaries, ~0.5 GiB on
the GRPO bench) and, in the loop shell, before the final checkpoint and export. Not between
the rollout and the update of every iteration: under the CLI's mimalloc that was measured on
the GRPO bench at ~1.5 s an iteration of page faults (13.7 -> 15.2 s) with the same peak
(the update's buffers and the rollout's are re-faulted each time, and the steady state holds
both phases' high-water marks either way: 5.2 GiB resident after the first iteration).
"""

from __future__ import annotations

import logging
from pathlib import Path

from jaxalign import runtime

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


class PhaseMemory:
    """Marks phase boundaries; `take()` hands the figures since the last call to perf."""

    def __init__(self):
        self.fields: dict[str, float] = {}

    def start(self) -> None:
        _reset_peak()

    def end(self, phase: str) -> None:
        s = _status()
        if "VmRSS" in s:
            self.fields[f"rss_{phase}_gib"] = round(s["VmRSS"], 4)
            self.fields[f"rss_peak_{phase}_gib"] = round(s["VmHWM"], 4)
        self.start()

    def release(self) -> None:
        """The allocator's free pages back to the system (once the programs are compiled)."""
        released = runtime.release_free_memory()
        if released is not None:
            self.fields["rss_released_gib"] = round(released, 4)

    def take(self) -> dict[str, float]:
        out, self.fields = self.fields, {}
        return out
