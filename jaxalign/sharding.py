"""The device mesh and the one table that maps logical axis names to it.

Layer code names the axes of every weight and activation ('embed', 'heads', 'batch', ...);
only this module knows which mesh axis each name lands on.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxalign.config import JaxalignError, MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated). Weights are sharded over
# `fsdp` along their model dimension and over `tensor` along heads / mlp / vocab;
# activations split the batch over both data-parallel axes.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("vector", None),   # norm scales and hidden-size biases: small, replicate them
    ("layers", None),   # the stacked-layer axis is scanned over, never split
    ("seq", None),
    ("lora_rank", None),
)
_RULES = dict(RULES)


class MeshError(JaxalignError):
    """The requested mesh does not fit the available devices."""


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh, resolving a -1 axis from the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    shape = list(cfg.shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise MeshError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}: "
                            f"{n} devices are not divisible by the fixed axes' product {known}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise MeshError(f"mesh data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor} needs "
                        f"{math.prod(shape)} devices, but {n} are available "
                        f"({jax.default_backend()}, {jax.process_count()} process(es))")
    # Auto axes: XLA propagates shardings through ops; under jax 0.10's default Explicit
    # axes a plain matmul of sharded operands can raise ShardingTypeError.
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
    """PartitionSpec for an array whose axes carry `names`.

    A dimension that the mapped mesh axes do not divide is replicated instead (e.g. 3 KV
    heads on tensor=2): correct everywhere, slightly less memory-efficient there.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for an array of shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for name, dim in zip(names, shape):
        axes = _RULES.get(name) if name is not None else None
        if name is not None and name not in _RULES:
            raise KeyError(f"logical axis name {name!r} has no rule in jaxalign.sharding.RULES")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def named(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, spec(names, shape, mesh))


def tree_shardings(abstract: Any, names: Any, mesh: Mesh) -> Any:
    """Shardings for a pytree of arrays / ShapeDtypeStructs given a matching tree of names."""
    return jax.tree.map(lambda x, n: named(n, x.shape, mesh), abstract, names,
                        is_leaf=lambda n: isinstance(n, tuple))


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding hint for an activation, resolved through RULES on the current mesh.

    Outside a mesh context (plain single-device use) it does nothing.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(names, x.shape, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2, shape: Sequence[int] | None = None) -> NamedSharding:
    """Batch-major arrays: leading axis over data x fsdp, the rest replicated."""
    names = ("batch",) + (None,) * (ndim - 1)
    if shape is None:
        return NamedSharding(mesh, P(("data", "fsdp")))
    return named(names, shape, mesh)


def put_global(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Places a host array that every process holds in full onto a (possibly multi-host) sharding.

    Each device receives only its own slice: no device ever gets the full array.
    """
    return jax.make_array_from_callback(host_array.shape, sharding, lambda idx: host_array[idx])
