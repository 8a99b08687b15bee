"""Several processes (hosts) as one run: joining JAX's multi-controller runtime, and the few
host-side exchanges a training loop needs beyond the jitted programs' own collectives.

Joining (`initialize`, called by the CLI before anything touches a device), first match wins:
  1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` on the command
     line, or the environment JAXALIGN_COORDINATOR / JAXALIGN_NUM_PROCESSES /
     JAXALIGN_PROCESS_ID, or JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
     JAX_PROCESS_ID;
  2. a cluster JAX detects by itself, when it says there are several processes: SLURM
     (SLURM_NTASKS > 1 inside an srun step), Open MPI (OMPI_COMM_WORLD_SIZE > 1), a TPU pod
     slice whose worker list names several hosts (TPU_WORKER_HOSTNAMES /
     TPU_PROCESS_ADDRESSES);
  3. JAXALIGN_DISTRIBUTED=on asks for JAX's detection anywhere (a Cloud TPU pod VM, whose
     workers are listed only in the metadata server); JAXALIGN_DISTRIBUTED=off never joins.
Otherwise the run is one process. On CPU the cross-process collectives go over gloo, which
must be chosen before the backend starts; on GPU / TPU that setting is not read.

Every process runs the same Python loop on the same global batch description; each owns the
rows its devices hold (`process_rows`), reads them back (`local_rows`) and exchanges small
host values with the others (`allgather_json`).
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np

from jaxalign.config import ConfigError
from jaxalign.sharding import MeshError, batch_sharding

log = logging.getLogger(__name__)

ENV_MODE = "JAXALIGN_DISTRIBUTED"     # auto (default) | on | off
ENV_INIT_TIMEOUT = "JAXALIGN_INIT_TIMEOUT"            # s to wait for every process to join
ENV_HEARTBEAT_TIMEOUT = "JAXALIGN_HEARTBEAT_TIMEOUT"  # s without a heartbeat: process lost
ENV_BIND = "JAXALIGN_COORDINATOR_BIND"                # HOST:PORT the coordinator listens on


class DistributedError(ConfigError):
    """A process could not join the run, or the processes do not run the same thing."""


def _env_seconds(name: str, default: int) -> int:
    value = _env_int(name)
    if value is not None and value < 1:
        raise ConfigError(f"{name}={value}: expected a number of seconds >= 1")
    return default if value is None else value


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r}: expected an integer") from None
    return None


def detected_cluster() -> str | None:
    """The multi-process cluster this process runs in, as JAX would detect it, or None when
    there is none or it has a single process (then joining is pointless)."""
    env = os.environ
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "tpu"
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, watch: bool = False,
               supervise: list[str] | None = None) -> str | None:
    """Joins the multi-controller runtime when asked to (see the module doc); returns how
    ('explicit', a cluster name, 'auto') or None for a single-process run. `watch`: start
    the peer watchdog (`_watch`; the CLI, which then calls `end` before JAX shuts down).
    `supervise`: the command line's arguments; a multi-process run then does its work in a
    child of this process (`jaxalign.supervise`: a lost coordinator gets one line)."""
    mode = os.environ.get(ENV_MODE, "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"{ENV_MODE}={mode!r}: expected auto, on or off")
    if mode == "off":
        return None
    coordinator = (coordinator or os.environ.get("JAXALIGN_COORDINATOR")
                   or os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if num_processes is None:
        num_processes = _env_int("JAXALIGN_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAXALIGN_PROCESS_ID", "JAX_PROCESS_ID")
    how = "explicit" if coordinator else (detected_cluster() or ("auto" if mode == "on" else None))
    if how is None:
        return None
    if how == "explicit" and (num_processes is None or process_id is None):
        raise ConfigError(f"coordinator {coordinator} given without the number of processes and "
                          "this process's id (--num-processes / --process-id, or "
                          "JAXALIGN_NUM_PROCESSES / JAXALIGN_PROCESS_ID)")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"process id {process_id} is not in [0, {num_processes})")
    from jaxalign import supervise as sup
    if not sup.claim_child() and supervise is not None:
        sup.run(supervise)   # never returns
    # CPU collectives across processes (read when the CPU backend starts; harmless elsewhere).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Whatever was not given explicitly, JAX fills in from the cluster it detects.
    peer_timeout = _env_seconds(ENV_HEARTBEAT_TIMEOUT, 30)
    # JAX's own heartbeat check aborts every process with a C++ trace; ours (`_watch`) names
    # the lost process in one line first, so JAX's is set well past it.
    kw = {"initialization_timeout": _env_seconds(ENV_INIT_TIMEOUT, 120),
          "heartbeat_timeout_seconds": peer_timeout + 60}
    if how == "explicit" and process_id != 0:
        # A coordinator that never answers makes JAX's Connect abort (C++ trace) after its
        # timeout; probing the address first turns that into one line naming it.
        _wait_for_coordinator(coordinator, process_id, kw["initialization_timeout"])
    bind = os.environ.get(ENV_BIND) or (coordinator if how == "explicit" else None)
    if bind:
        # JAX's default binds the coordinator on every interface ([::]:PORT). Bind where the
        # others connect instead: loopback for a single-host run (127.0.0.1:PORT), the
        # address given for a multi-host one (JAXALIGN_COORDINATOR_BIND overrides).
        kw["coordinator_bind_address"] = bind
    try:
        jax.distributed.initialize(coordinator, num_processes=num_processes,
                                   process_id=process_id, **kw)
    except Exception as e:  # jaxlib raises its own XlaRuntimeError; keep one line of it
        if isinstance(e, ConfigError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise DistributedError(
            f"process {process_id} could not join the run at coordinator {coordinator or how} "
            f"within {kw['initialization_timeout']} s ({ENV_INIT_TIMEOUT}): {first}") from None
    log.info("process %d/%d joined (%s); %d local / %d global devices", jax.process_index(),
             jax.process_count(), how, jax.local_device_count(), jax.device_count())
    from jax._src import distributed as jd
    sup.report_joined(jax.process_index(), jax.process_count(),
                      getattr(jd.global_state, "coordinator_address", None) or coordinator)
    if watch and jax.process_count() > 1:
        _start_watch(peer_timeout, coordinator or how)
    return how


def _wait_for_coordinator(address: str, process_id: int, timeout_s: int) -> None:
    import socket
    import time
    host, _, port = address.rpartition(":")
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            last = e
            time.sleep(0.5)
    raise DistributedError(f"process {process_id}: the coordinator {address} did not answer "
                           f"within {timeout_s} s ({ENV_INIT_TIMEOUT}); is process 0 running "
                           f"there, and the address reachable from here? ({last})")


# ----------------------------------------------------------------------------- liveness
# Each process writes a counter to the coordination service's key-value store every second
# and reads its peers'. A peer whose counter stops for JAXALIGN_HEARTBEAT_TIMEOUT seconds
# (SIGKILL, OOM kill, a dead host) makes this process exit 1 with one line naming it, instead
# of waiting in a collective until JAX aborts. A process that ends writes its exit status
# (`mark_exit`): the others stop watching it after a success and stop too after a failure.
# The key-value store is reached through jax._src.distributed: JAX has no public API for it.

_watch_state = {"stop": None, "timeout": 0, "thread": None}
PEER_ERROR_GRACE_S = 3.0


def _client():
    from jax._src import distributed as jd
    return jd.global_state.client


def _start_watch(timeout_s: int, where: str) -> None:
    import threading
    stop = threading.Event()
    thread = threading.Thread(target=_watch, args=(stop, timeout_s, where), daemon=True,
                              name="jaxalign-peer-watch")
    _watch_state.update(stop=stop, timeout=timeout_s, thread=thread)
    thread.start()


def failing() -> None:
    """This process is about to print its own error and exit: the watchdog stays silent (one
    error line a process), while `mark_exit` still tells the others."""
    _watch_state["failing"] = True


def _die(msg: str) -> None:
    import sys
    if _watch_state.get("failing"):
        return
    sys.stderr.write(f"jaxalign: error: {msg}\n")
    sys.stderr.flush()
    os._exit(1)   # the main thread may sit in a collective that never returns


def _watch(stop, timeout_s: int, where: str) -> None:
    import time
    me, n, client = jax.process_index(), jax.process_count(), _client()
    seen = {q: (None, time.monotonic()) for q in range(n) if q != me}
    beat = 0
    while not stop.wait(1.0):
        beat += 1
        try:
            client.key_value_set(f"jaxalign/alive/{me}", str(beat), allow_overwrite=True)
            for q, (value, since) in list(seen.items()):
                try:
                    now_value = client.key_value_try_get(f"jaxalign/alive/{q}")
                except Exception as e:   # NOT_FOUND: it has not written yet
                    if "NOT_FOUND" not in str(e):
                        raise
                    now_value = None
                if now_value is not None and now_value.startswith("exit:"):
                    if now_value == "exit:0":
                        del seen[q]
                    elif value != now_value:
                        # A failed peer: give this process a moment to reach the same error
                        # itself (a check every process makes), so it prints that line.
                        seen[q] = (now_value, time.monotonic())
                    elif time.monotonic() - since > PEER_ERROR_GRACE_S and not stop.is_set():
                        _die(f"process {q} of {n} stopped with an error (its log says why); "
                             f"process {me} stops too")
                elif now_value != value:
                    seen[q] = (now_value, time.monotonic())
                elif time.monotonic() - since > timeout_s and not stop.is_set():
                    _die(f"process {q} of {n} stopped responding: no heartbeat for {timeout_s} s "
                         f"({ENV_HEARTBEAT_TIMEOUT}; killed, out of memory or its host down); "
                         f"process {me} stops too. Rerun the same command on every process to "
                         "resume from the last checkpoint")
        except Exception as e:
            if not stop.is_set():
                _die(f"process 0 of {n} (the coordinator, {where}) stopped answering "
                     f"({(str(e).splitlines() or [type(e).__name__])[0][:200]}); process {me} "
                     "stops too. Rerun the same command on every process to resume from the "
                     "last checkpoint")
            return


def mark_exit(returncode: int) -> None:
    """Tells the other processes this one is ending (`_watch`); call once, at exit."""
    stop = _watch_state["stop"]
    if stop is None or stop.is_set():
        return
    stop.set()
    _watch_state["thread"].join(timeout=5)   # not mid-call when JAX's shutdown frees the client
    try:
        _client().key_value_set(f"jaxalign/alive/{jax.process_index()}", f"exit:{returncode}",
                                allow_overwrite=True)
    except Exception:   # the coordinator is gone already: nothing to tell
        pass


def end(returncode: int, error: BaseException | None = None) -> None:
    """The CLI's last word in a multi-process run: `mark_exit`, then, after a failure, leave
    at once. JAX's exit handler would wait for the peers at a shutdown barrier they never
    reach (they stop on the mark); process 0 first gives them a moment to read it, since
    the coordination service ends with it. `error`: an unexpected exception; a collective
    whose peer died fails with one, so the watcher gets its timeout to name the lost peer
    before the exception is printed."""
    if _watch_state["stop"] is None:
        return
    import sys
    import time
    if error is not None and isinstance(error, Exception):
        time.sleep(_watch_state["timeout"] + 3)     # `_watch` may end the process meanwhile
        import traceback
        traceback.print_exception(error, file=sys.stderr)
        returncode = 1
    mark_exit(returncode)
    if returncode != 0:
        if jax.process_index() == 0:
            time.sleep(3)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(returncode)


def check_same_run(raw: dict) -> None:
    """Every process of a multi-process run must run the same resolved config on the same
    data: the flattened config (dotted key -> value) plus, for every value that names a
    file, its size and a hash of its head and tail, are exchanged; the first key where a
    process differs from process 0 stops every process with one line naming both."""
    if jax.process_count() == 1:
        return
    mine = _fingerprint(raw)
    every = allgather_json(mine)
    ref = every[0]
    for p, theirs in enumerate(every[1:], start=1):
        for key in sorted(set(ref) | set(theirs)):
            if ref.get(key) != theirs.get(key):
                raise DistributedError(
                    f"process {p} runs another configuration than process 0: {key} is "
                    f"{theirs.get(key, '(unset)')} there and {ref.get(key, '(unset)')} on "
                    "process 0; start every process with the same config and data")


def _fingerprint(raw, prefix: str = "") -> dict[str, str]:
    import hashlib
    from pathlib import Path
    out = {}
    items = raw.items() if isinstance(raw, dict) else (
        enumerate(raw) if isinstance(raw, (list, tuple)) else None)
    if items is None:
        out[prefix or "(config)"] = json.dumps(raw, sort_keys=True, default=str)
        if isinstance(raw, str) and len(raw) < 4096:
            path = Path(raw).expanduser()
            try:
                if path.is_file():
                    size = path.stat().st_size
                    h = hashlib.sha1()
                    with open(path, "rb") as f:
                        h.update(f.read(1 << 20))
                        f.seek(max(0, size - (1 << 20)))
                        h.update(f.read(1 << 20))
                    out[f"{prefix} (file {raw})"] = f"{size} bytes, sha1 of head+tail {h.hexdigest()[:16]}"
            except OSError:
                pass
        return out
    for k, v in items:
        out.update(_fingerprint(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# ----------------------------------------------------------------------------- rows

def process_rows(mesh, rows: int) -> slice:
    """The rows of a `rows`-long batch-sharded array (`sharding.batch_sharding`) that this
    process's devices hold, as one slice; an error naming the mesh when they are not one
    contiguous block (a device order that interleaves processes)."""
    spans = sorted({(idx[0].start or 0, rows if idx[0].stop is None else idx[0].stop)
                    for idx in batch_sharding(mesh).addressable_devices_indices_map((rows,)).values()})
    lo, hi = spans[0]
    for a, b in spans[1:]:
        if a > hi:
            raise MeshError(f"mesh {dict(mesh.shape)}: process {jax.process_index()}'s devices "
                            f"hold rows that are not one block ({spans}); order the devices by "
                            "process")
        hi = max(hi, b)
    return slice(lo, hi)


def check_even_split(mesh, rows: int, what: str) -> slice:
    """This process's rows, which must be the even split [i*rows/P, (i+1)*rows/P) that the
    per-process data loaders produce; one line naming `what` and the fix otherwise."""
    n, i = jax.process_count(), jax.process_index()
    if rows % n:
        raise ConfigError(f"{what} = {rows} rows cannot be split over {n} processes; use a "
                          f"multiple of {n}")
    mine = process_rows(mesh, rows)
    per = rows // n
    if (mine.start, mine.stop) != (i * per, (i + 1) * per):
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        raise ConfigError(f"mesh data x fsdp = {shards} does not give each of the {n} processes "
                          f"its own rows of {what} (process {i} holds rows "
                          f"{mine.start}:{mine.stop}); make data x fsdp a multiple of {n}")
    return mine


def local_rows(x: jax.Array, rows: slice) -> np.ndarray:
    """Rows `rows` of a batch-sharded global array, read from this process's own shards."""
    if x.is_fully_addressable:
        return np.asarray(x)[rows]
    out = np.empty((rows.stop - rows.start,) + x.shape[1:], x.dtype)
    for shard in x.addressable_shards:
        r = shard.index[0]
        a, b = (r.start or 0), (x.shape[0] if r.stop is None else r.stop)
        if a >= rows.start and b <= rows.stop:
            out[(slice(a - rows.start, b - rows.start),) + tuple(shard.index[1:])] = np.asarray(shard.data)
    return out


def allgather_json(obj) -> list:
    """Every process's `obj` (anything JSON holds; floats round-trip exactly), in process
    order. One process: [obj] without any collective."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int32(len(data)))).reshape(-1)
    # Padded to a power of two (>= 4 KiB): a handful of shapes, so a handful of compiles.
    size = max(4096, 1 << int(sizes.max() - 1).bit_length())
    buf = np.zeros(size, np.uint8)
    buf[:len(data)] = data
    every = np.asarray(multihost_utils.process_allgather(buf))
    return [json.loads(bytes(every[p, :sizes[p]]).decode()) for p in range(len(sizes))]


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any. For decisions all processes must
    take at the same step: a stop signal reaches the processes of a job at different
    moments, and a checkpoint is written by all of them together."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())
