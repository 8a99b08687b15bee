"""The real multi-process code path on one machine (docs/architecture.md): two processes with
two fake CPU devices each join over gloo, load an HF checkpoint onto a mesh that spans
both, compute logits, and export the checkpoint again.

The test itself is the launcher; this same file, run as a script, is the worker.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from multiproc import free_port, launch, python, worker_env

pytestmark = pytest.mark.slow  # spawns several JAX processes

TIMEOUT_S = 300   # generous: the CI machine may be shared
NUM_PROCESSES = 2
LOCAL_DEVICES = 2
B, T = 4, 12


def _batch():
    rng = np.random.default_rng(0)
    seg = np.ones((B, T), np.int32)
    seg[0, :3] = 0
    seg[3, 8:] = 0
    tokens = np.where(seg > 0, rng.integers(3, 96, (B, T)), 0).astype(np.int32)
    return tokens, seg


def test_two_processes_match_single_process(tmp_path):
    import jax
    from conftest import make_tiny_hf
    from jaxalign.convert import hf
    from jaxalign.models import functional

    src = tmp_path / "src"
    make_tiny_hf(src, seed=8, attention_bias=True)
    tokens, seg = _batch()
    cfg, params, _ = hf.load(src)
    ref = np.asarray(jax.jit(lambda p, t, s: functional.apply(cfg, p, t, segment_ids_BT=s)[0])(
        params, tokens, seg))
    np.save(tmp_path / "reference.npy", ref)

    port = free_port()
    # Each worker sees two fake devices (not the eight of this pytest process).
    launch([python(__file__, f"127.0.0.1:{port}", str(i), str(src), str(tmp_path))
            for i in range(NUM_PROCESSES)],
           [worker_env(LOCAL_DEVICES) for _ in range(NUM_PROCESSES)], TIMEOUT_S)

    report = json.loads((tmp_path / "result.json").read_text())
    assert report["global_devices"] == NUM_PROCESSES * LOCAL_DEVICES
    assert report["fully_addressable"] is False, "params did not span both processes"
    assert report["max_diff"] <= 1e-5, report
    # The export gathered the shards from both processes into the exact source bytes.
    from conftest import assert_bitwise_equal, read_tensors
    assert_bitwise_equal(read_tensors(src), read_tensors(tmp_path / "export"))


def worker(coordinator: str, process_id: int, src: str, work: str) -> None:
    start = time.monotonic()
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxalign import distributed, sharding
    from jaxalign.config import MeshConfig
    from jaxalign.convert import hf
    from jaxalign.models import functional

    t_import = time.monotonic()
    distributed.initialize(coordinator, NUM_PROCESSES, process_id)
    t_init = time.monotonic()
    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == LOCAL_DEVICES
    # fsdp x tensor over the 4 global devices: every weight is split across both processes.
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    cfg, params, hf_config = hf.load(src, mesh)

    tokens, seg = _batch()  # every process holds the whole batch; each device gets its rows
    batch_sh = sharding.batch_sharding(mesh, 2, tokens.shape)
    tokens_g = sharding.put_global(tokens, batch_sh)
    seg_g = sharding.put_global(seg, batch_sh)
    fwd = jax.jit(lambda p, t, s: functional.apply(cfg, p, t, segment_ids_BT=s)[0],
                  in_shardings=(functional.param_shardings(cfg, mesh), batch_sh, batch_sh),
                  out_shardings=NamedSharding(mesh, P()))
    with jax.set_mesh(mesh):
        logits = fwd(params, tokens_g, seg_g)
    local = np.asarray(logits.addressable_shards[0].data)  # replicated: the full array
    t_fwd = time.monotonic()

    hf.save(Path(work) / "export", cfg, params, hf_config=hf_config, source_dir=src)
    if process_id == 0:
        ref = np.load(Path(work) / "reference.npy")
        real = seg > 0
        report = {
            "global_devices": jax.device_count(),
            "fully_addressable": bool(params["embed"].is_fully_addressable),
            "max_diff": float(np.abs(local - ref)[real].max()),
            "seconds": {"import": t_import - start, "init": t_init - t_import,
                        "load+forward": t_fwd - t_init, "export": time.monotonic() - t_fwd},
        }
        (Path(work) / "result.json").write_text(json.dumps(report))
    jax.distributed.shutdown()


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
