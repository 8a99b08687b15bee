"""Memory pre-flight: before the first step, the compiled programs' memory analysis against
the memory the devices have; a run that cannot fit is refused with one line that says by how
much and which setting would help, instead of dying an hour later. Every run writes what was
compared to run_dir/memory.json.

The programs are the ones the run then executes (AOT-compiled once: `.lower().compile()`),
so the check costs no second compilation. Per device, a program needs its arguments +
outputs - aliased (donated) outputs + temporaries (XLA's figures), plus the run's other
resident buffers that it does not take as arguments (e.g. the PPO reference and reward
models while the train step runs). The run needs the largest of these over its programs.

What a device has: `train.memory_limit_gb` when set (per device; tests force a refusal with
it); else on GPU / TPU the allocator's `bytes_limit`; on CPU the host's MemAvailable (from
/proc/meminfo) or, when smaller, what the process's memory cgroup has left (v2 memory.max,
v1 memory.limit_in_bytes: containers, SLURM --mem), read after the models are loaded, so
their buffers are added back, shared by the process's devices (fake CPU devices share one RAM).

XLA's temporaries are its own buffer-assignment figure; the allocator's fragmentation and
the runtime's own overhead come on top, so a run that fits by a few percent can still fail.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import jax

from jaxalign.config import JaxalignError

log = logging.getLogger(__name__)

GiB = 2**30
_STATS = ("argument", "output", "alias", "temp", "generated_code")


class MemoryPreflightError(JaxalignError):
    """The run's programs need more memory per device than the devices have."""


@dataclasses.dataclass(frozen=True)
class Knobs:
    """The settings the refusal can suggest, as the run has them."""
    remat: str                    # model.remat
    grad_accum: int               # train.grad_accum
    can_double_accum: bool        # the micro-batch still splits over the devices at 2x
    lora_rank: int
    fsdp: int                     # mesh.fsdp as resolved
    devices: int                  # devices this run could shard over (jax.device_count())


def per_device_bytes(*trees) -> int:
    """Bytes one device holds of these arrays (each counted once, by identity)."""
    seen, total = set(), 0
    for x in jax.tree.leaves(trees):
        if id(x) in seen:
            continue
        seen.add(id(x))
        sh = getattr(x, "sharding", None)
        shape = sh.shard_shape(x.shape) if sh is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def mem_available() -> int:
    """The host's MemAvailable in bytes (Linux), else 0."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None   # "max": no limit


def _inactive_file(stat: Path) -> int:
    # Page cache the kernel reclaims before it OOM-kills: counted as free, as MemAvailable does.
    try:
        for line in stat.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


CGROUP_ROOT, PROC_CGROUP = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")


def cgroup_available(root: Path | None = None,
                     proc_cgroup: Path | None = None) -> tuple[int, str] | None:
    """(bytes this process's memory cgroup has left, the file that limits it), or None when
    no limit applies. A container or a SLURM --mem job is killed at its cgroup's limit, which
    /proc/meminfo does not show. v2: the tightest `memory.max` of this cgroup and its
    ancestors, less `memory.current`; v1: `memory.limit_in_bytes` less `memory.usage_in_bytes`.
    Reclaimable page cache (inactive_file) counts as free."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    best = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":                                   # v2 unified hierarchy
            d = root / rel.lstrip("/")
            while True:
                limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
                if limit is not None and used is not None:
                    left = limit - used + _inactive_file(d / "memory.stat")
                    if best is None or left < best[0]:
                        best = (max(left, 0), str(d / "memory.max"))
                if d == root or root not in d.parents:
                    break
                d = d.parent
        elif "memory" in controllers.split(","):                # v1
            for d in (root / "memory" / rel.lstrip("/"), root / "memory"):
                limit = _read_int(d / "memory.limit_in_bytes")
                used = _read_int(d / "memory.usage_in_bytes")
                if limit is not None and used is not None and limit < 2**60:
                    left = limit - used + _inactive_file(d / "memory.stat")
                    if best is None or left < best[0]:
                        best = (max(left, 0), str(d / "memory.limit_in_bytes"))
                    break
    return best


def host_available() -> tuple[int, str]:
    """(bytes, what limits them): the smaller of MemAvailable and the cgroup's room."""
    avail, where = mem_available(), "host MemAvailable"
    cg = cgroup_available()
    if cg is not None and (not avail or cg[0] < avail):
        avail, where = cg[0], f"cgroup limit ({cg[1]}) room"
    return avail, where


def device_limit(mesh, limit_gb: float | None, resident: int) -> tuple[int | None, str]:
    """(bytes per device, where that figure comes from); None when nobody says."""
    if limit_gb is not None:
        return int(limit_gb * GiB), f"train.memory_limit_gb={limit_gb:g}"
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    if local[0].platform == "cpu":
        avail, where = host_available()
        if not avail:
            return None, "host memory unknown"
        return (avail + resident * len(local)) // len(local), (
            f"{where} {avail / GiB:.2f} GiB + this run's loaded buffers, over "
            f"{len(local)} CPU device(s)")
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
    if None in limits:
        return None, f"{local[0].platform} memory unknown"
    return min(limits), f"{local[0].device_kind} bytes_limit"


def _fmt(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if abs(n) >= 2**20 else f"{n / 2**10:.1f} KiB"


def program_stats(exe) -> dict[str, int] | None:
    m = exe.memory_analysis()
    if m is None:
        return None
    return {k: int(getattr(m, f"{k}_size_in_bytes")) for k in _STATS}


def _suggestions(knobs: Knobs, activations: int, weights: int) -> list[str]:
    act, wts = [], []
    if knobs.remat != "full":
        act.append("model.remat=full")
    if knobs.can_double_accum:
        act.append(f"train.grad_accum={2 * knobs.grad_accum}")
    if knobs.lora_rank == 0:
        wts.append("lora.rank=16")
    if knobs.fsdp < knobs.devices:
        wts.append(f"mesh.fsdp={knobs.devices}")
    ordered = [act, wts] if activations >= weights else [wts, act]
    out = [s for group in ordered for s in group]
    return out or ["more devices or a device with more memory"]


def _agreed_limit(mesh, limit_gb: float | None, resident: int) -> tuple[int | None, str]:
    limit, source = device_limit(mesh, limit_gb, resident)
    if jax.process_count() > 1 and limit is not None:
        # Every process must take the same decision, or the refused one leaves the others
        # waiting in a collective: the smallest host / device decides.
        import numpy as np
        from jax.experimental import multihost_utils
        # (in MiB as float32: without jax_enable_x64 an int64 would be cut to int32)
        mib = multihost_utils.process_allgather(np.float32(limit / 2**20))
        limit = int(float(np.asarray(mib).min()) * 2**20)
    return limit, source


def check_resident(run_dir: Path, mesh, resident: dict, knobs: Knobs,
                   limit_gb: float | None) -> None:
    """The part of the pre-flight that needs no compiled program, run before compiling: the
    arrays that live for the whole run (params, optimizer state, frozen models) are known from
    their shapes and shardings. When they alone exceed the device, the run is refused here,
    without spending the compile; otherwise `check` follows on the compiled programs."""
    sizes = {k: per_device_bytes(v) for k, v in resident.items()}
    total = per_device_bytes(*resident.values())
    limit, source = _agreed_limit(mesh, limit_gb, total)
    if limit is None or total <= limit:
        return
    report = {"preflight": {"resident_per_device": sizes, "need_per_device": total,
                            "worst_program": None, "limit_per_device": limit,
                            "limit_source": source, "fits": False,
                            "refused": "before compiling: the resident arrays alone"}}
    if jax.process_index() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    parts = ", ".join(f"{k} {_fmt(v)}" for k, v in sizes.items() if v)
    tips = _suggestions(dataclasses.replace(knobs, remat="full", can_double_accum=False), 0, total)
    raise MemoryPreflightError(
        f"memory pre-flight: the run's resident arrays alone need {_fmt(total)} per device "
        f"({parts}) and {_fmt(limit)} are there ({source}): {_fmt(total - limit)} short; "
        f"refused before compiling. Try {' or '.join(tips)} (see {Path(run_dir) / 'memory.json'})")


def check(run_dir: Path, mesh, programs: dict, resident: dict, knobs: Knobs,
          limit_gb: float | None, report: dict | None = None) -> dict:
    """Compares and writes memory.json; raises MemoryPreflightError if the run cannot fit.

    programs  name -> (compiled executable, the resident trees it takes as arguments)
    resident  category ('params', 'optimizer', ...) -> the arrays that live for the run
    report    what to extend (the RL driver's role report), else a fresh one."""
    report = dict(report or {})
    sizes = {k: per_device_bytes(v) for k, v in resident.items()}
    total_resident = per_device_bytes(*resident.values())
    limit, source = _agreed_limit(mesh, limit_gb, total_resident)
    worst, need, per_program = None, 0, {}
    for name, (exe, args) in programs.items():
        stats = program_stats(exe)
        if stats is None:
            continue
        others = total_resident - per_device_bytes(*args)
        stats["peak_estimate"] = (stats["argument"] + stats["output"] - stats["alias"]
                                  + stats["temp"])
        stats["with_other_resident"] = stats["peak_estimate"] + others
        per_program[name] = stats
        if stats["with_other_resident"] > need:
            worst, need = name, stats["with_other_resident"]
    report.setdefault("programs", {}).update(
        {k: {s: v[s] for s in (*_STATS, "peak_estimate")} for k, v in per_program.items()})
    report["preflight"] = {"resident_per_device": sizes, "need_per_device": need,
                           "worst_program": worst, "limit_per_device": limit,
                           "limit_source": source,
                           "fits": None if limit is None or worst is None else need <= limit}
    if jax.process_index() == 0:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "memory.json").write_text(json.dumps(report, indent=2) + "\n")
    if worst is None or limit is None:
        log.info("memory pre-flight skipped: %s", "no memory analysis" if worst is None else source)
        return report
    acts = per_program[worst]["temp"]
    weights = sizes.get("params", 0) + sizes.get("frozen", 0) + sizes.get("optimizer", 0)
    parts = ", ".join(f"{k} {_fmt(v)}" for k, v in sizes.items() if v)
    msg = (f"the {worst} program needs about {_fmt(need)} per device ({parts}, "
           f"activations/temporaries {_fmt(acts)}) and {_fmt(limit)} are there ({source})")
    if need > limit:
        tips = _suggestions(knobs, acts, weights)
        raise MemoryPreflightError(
            f"memory pre-flight: {msg}: {_fmt(need - limit)} short; refused before "
            f"the first step. Try {' or '.join(tips)} (see {Path(run_dir) / 'memory.json'})")
    log.info("memory pre-flight: %s; fits with %s to spare", msg, _fmt(limit - need))
    return report
