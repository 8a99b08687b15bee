"""A multi-process run's command as a parent that supervises the real work in a child.

Why: process 0 hosts JAX's coordination service. When it dies, every other process's
coordination client learns it at once (its error poll fails) and aborts the process from
C++ (LOG(FATAL): SIGABRT, a native stack trace on stderr), before any Python code can run;
jaxlib's only hook, the client's `missed_heartbeat_callback`, cannot be given a Python
function (the status it passes has no Python conversion: the process terminates). So the
command the user started stays as a thin parent: the child (the same command line, with
JAXALIGN_SUPERVISED set) does the work, its stdout goes straight through, its stderr line by
line. When the child ends with a failure and the coordinator's address no longer accepts
connections, the parent prints one line naming process 0 instead of the child's native
abort. Any other ending (a crash of this process itself, SIGABRT included) is passed through
unchanged: the child's whole stderr, and the same exit status or signal.

The child dies with the parent (PR_SET_PDEATHSIG), so killing the command a user started
kills its work; SIGTERM / SIGINT / SIGHUP / SIGUSR1 / SIGUSR2 are passed on to it.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

ENV_CHILD = "JAXALIGN_SUPERVISED"    # set in the child: the fd to report its place on
HOLD_S = 3.0       # a native log line (and what follows it) is held this long before shown
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# Lines the native runtime writes: glog / absl (`F1206 17:44:27.826808 2776 client.h:80]`),
# the failure signal handler's dump, and the C++ runtime's terminate message.
NATIVE = re.compile(rb"^\s*([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]|\*\*\* |@ +0x|PC: @"
                    rb"|terminate called)")
ERROR_PREFIX = b"jaxalign: error:"


_report_fd: list[int] = []


def claim_child() -> bool:
    """Whether this process is a supervised child. Takes the variable out of the
    environment, so that commands this one starts (which have no such fd) are not taken
    for children themselves."""
    fd = os.environ.pop(ENV_CHILD, None)
    if fd is None:
        return False
    if fd.isdigit():
        _report_fd.append(int(fd))
    return True


def report_joined(process: int, processes: int, coordinator: str | None) -> None:
    """In the child, once joined: tells the parent which process this is and where the
    coordinator is (for a detected cluster only JAX knew)."""
    if not _report_fd:
        return
    fd = _report_fd.pop()
    try:
        os.write(fd, (json.dumps({"process": process, "processes": processes,
                                  "coordinator": coordinator}) + "\n").encode())
        os.close(fd)
    except OSError:
        pass


def _die_with_parent() -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)   # PR_SET_PDEATHSIG


def run(argv: list[str]) -> None:
    """Runs `python -P -m jaxalign.cli ARGV` as a supervised child; exits as described in
    the module doc (never returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    info_r, info_w = os.pipe()
    env = dict(os.environ, **{ENV_CHILD: str(info_w)})
    parent = os.getpid()

    def setup():  # in the child, before exec
        if sys.platform.startswith("linux"):
            _die_with_parent()
        if os.getppid() != parent:   # the parent died before the line above
            os._exit(1)

    child = subprocess.Popen([sys.executable, "-P", "-m", "jaxalign.cli", *argv], env=env,
                             stderr=subprocess.PIPE, pass_fds=(info_w,), preexec_fn=setup)
    os.close(info_w)
    for s in FORWARDED:
        signal.signal(s, lambda signum, _f: child.send_signal(signum))
    held, wrote_error = _pump(child.stderr.fileno())
    rc = child.wait()
    info = _read_info(info_r)
    if rc != 0 and _coordinator_lost(info):
        kept = _without_native(held)
        _write(kept)
        if not wrote_error and not any(l.startswith(ERROR_PREFIX) for l in kept):
            # (else the child's own watchdog named the lost coordinator first)
            sys.stderr.write(
                f"jaxalign: error: process 0 of {info['processes']} (the coordinator, "
                f"{info['coordinator']}) stopped: its address no longer accepts connections "
                f"(killed, out of memory or its host down); process {info['process']} stops "
                "too. Rerun the same command on every process to resume from the last "
                "checkpoint\n")
        sys.exit(1)
    _write(held)
    if rc < 0:   # the same death as the child's: a shell or a scheduler sees what happened
        sys.stdout.flush()
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
    sys.exit(rc)


def _write(lines: list[bytes]) -> None:
    sys.stderr.flush()
    for line in lines:
        os.write(2, line)


def _without_native(held: list[bytes]) -> list[bytes]:
    """The held lines before the first native one, and our own error lines after it: the
    child's output without the abort that its lost coordinator caused."""
    for i, line in enumerate(held):
        if NATIVE.match(line):
            return held[:i] + [l for l in held[i:] if l.startswith(ERROR_PREFIX)]
    return held


def _pump(fd: int) -> tuple[list[bytes], bool]:
    """Copies the child's stderr to ours until it closes. Once a native line appears, it
    and every later line wait HOLD_S (an abort follows its first native line within
    milliseconds, so an abort is still held when the child ends). -> (the lines still
    held at the end, whether a `jaxalign: error:` line was seen)."""
    held: list[tuple[float, bytes]] = []
    rest, wrote_error = b"", False
    while True:
        wait = max(0.0, held[0][0] + HOLD_S - time.monotonic()) if held else None
        try:
            ready = select.select([fd], [], [], wait)[0]
        except InterruptedError:
            continue
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                line += b"\n"
                if held or NATIVE.match(line):
                    held.append((time.monotonic(), line))
                else:
                    wrote_error = wrote_error or line.startswith(ERROR_PREFIX)
                    os.write(2, line)
        now = time.monotonic()
        while held and held[0][0] + HOLD_S <= now:
            line = held.pop(0)[1]
            wrote_error = wrote_error or line.startswith(ERROR_PREFIX)
            os.write(2, line)
    return [line for _, line in held] + ([rest] if rest else []), wrote_error


def _read_info(fd: int) -> dict | None:
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    try:
        info = json.loads(data)
    except ValueError:
        return None   # the child ended before joining
    return info if isinstance(info, dict) else None


def _coordinator_lost(info: dict | None) -> bool:
    """True when this is not process 0 and process 0's coordinator refuses connections
    (or none come back within 3 s) after two tries."""
    if not info or info.get("process") in (None, 0) or not info.get("coordinator"):
        return False
    host, _, port = str(info["coordinator"]).rpartition(":")
    for attempt in range(2):
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
                return False
        except (OSError, ValueError):
            time.sleep(0.5 * (1 - attempt))
    return True
