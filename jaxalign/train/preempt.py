"""Preemption: SIGTERM (what schedulers and spot / preemptible VMs send before they kill)
and SIGINT ask a run to checkpoint and stop; the command then exits 3, and rerunning it
continues from that checkpoint.

The handlers are installed when a recipe starts loading (`run_recipe`), so a signal that
arrives while models load or programs compile is not lost either: the loop sees it before
its first step and stops with nothing to save. Python runs a handler between bytecodes, so
a signal delivered inside a jitted call takes effect when the call returns; the loops check
the flag after every step (supervised) and after the rollout and the update (RL), which
bounds the time to exit by one step or one rollout plus one checkpoint write.
"""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(KeyboardInterrupt):
    """The run stopped on SIGTERM / SIGINT after saving what it had; not a failure, not done
    (the CLI exits 3, `cli.EXIT_PREEMPTED`). A KeyboardInterrupt, so that code which lets
    Ctrl-C through lets this through."""


class StopFlag:
    """Context manager that turns SIGTERM / SIGINT into `signum` (checked by the loops).

    Re-entrant: nested uses share one flag, and the outermost restores the old handlers."""

    _depth = 0
    _old: dict = {}
    signum: int | None = None

    def __enter__(self):
        cls = type(self)
        if cls._depth == 0:
            cls.signum = None
            cls._old = {s: signal.signal(s, cls._handle) for s in SIGNALS}
        cls._depth += 1
        return self

    @classmethod
    def _handle(cls, signum, frame):
        if cls.signum is None:
            log.warning("received %s: will checkpoint and stop after this step",
                        signal.Signals(signum).name)
        cls.signum = signum

    def requested(self) -> bool:
        """Whether to stop now. With several processes, any process's signal stops all of
        them at the same step (a checkpoint is written by all together, so a process that
        stopped alone would leave the others waiting in the next collective)."""
        from jaxalign import distributed
        return distributed.any_process(type(self).signum is not None)

    def __exit__(self, *exc):
        cls = type(self)
        cls._depth -= 1
        if cls._depth == 0:
            for s, h in cls._old.items():
                signal.signal(s, h)
            cls._old = {}
