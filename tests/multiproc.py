"""The one subprocess harness of the multi-process tests: start N Python processes on this
machine (each with its own fake CPU devices), wait for all of them with one deadline, and
fail with every process's log tail when one fails or hangs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def free_port(lo: int | None = None, hi: int | None = None) -> int:
    """A TCP port nobody listens on: any (lo None), or the first free one in [lo, hi)."""
    for port in ([0] if lo is None else range(lo, hi)):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
        except OSError:
            continue
    pytest.skip("cannot bind a local TCP port for the coordinator")


def worker_env(local_devices: int, **extra: str) -> dict[str, str]:
    """This environment for a worker: `local_devices` fake CPU devices (not the pytest
    process's eight), this checkout and tests/ importable, no distributed settings
    inherited from the caller."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAXALIGN_COORDINATOR", "JAXALIGN_NUM_PROCESSES",
                                "JAXALIGN_PROCESS_ID", "SLURM_", "JAX_COORDINATOR",
                                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
    from conftest import child_xla_flags   # loaded already: only the pytest process calls this
    env["XLA_FLAGS"] = child_xla_flags(f"--xla_force_host_platform_device_count={local_devices}")
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXALIGN_ALLOCATOR"] = "system"   # no re-exec under mimalloc: one process per worker
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def launch(commands: list[list[str]], envs: list[dict[str, str]], timeout_s: float,
           returncode: int = 0) -> list[str]:
    """Runs the commands side by side (stdout and stderr together); -> their outputs.
    Fails the test, with every log's tail, on another exit status or past the deadline."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=str(ROOT)) for cmd, env in zip(commands, envs)]
    deadline = time.monotonic() + timeout_s
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"workers did not finish in {timeout_s} s:\n" +
                    "\n----\n".join(log[-3000:] for log in logs))
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == returncode, f"process {i} exited {p.returncode}:\n{out[-5000:]}"
    return outputs


def python(*args: str) -> list[str]:
    return [sys.executable, *args]
