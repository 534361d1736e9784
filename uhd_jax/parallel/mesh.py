"""The device mesh and the shardings of parameters, optimizer state and batches, from logical axis names.

Mesh axes are `data`, `fsdp`, `tensor` (`axes.MESH_AXES`); sizes come from a config, -1 meaning "the rest of the
devices". Everything is placed through `LOGICAL_AXIS_RULES`: parameters by the names they carry
(`nn.with_logical_partitioning`), batches along their leading (row) dimension. A dimension that its mesh axes do
not divide stays unsharded along them (listed by `param_shardings(..., report=...)`), so a mesh never fails to
compile for a small odd-sized parameter.

Multi-host: call `initialize_distributed()` first (a no-op on one process); `jax.devices()` then lists every
process's devices and the same mesh is built everywhere. Each process feeds only its own rows
(`global_batch`).
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from uhd_jax.parallel.axes import MESH_AXES, fit_spec, mesh_axes_of

BATCH_AXES = ("activation_batch",)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None) -> None:
    """`jax.distributed.initialize` when this run has several processes (arguments, or the environment that
    TPU pods and cluster launchers set); nothing on a single process. Call before anything touches a device."""
    if num_processes is None and coordinator_address is None and not _launcher_env():
        return
    # CPU collectives across processes (affects only the CPU backend; asking for the backend here would start it)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def _launcher_env() -> bool:
    return any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS"))


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """{data, fsdp, tensor} sizes (missing = 1, at most one -1 = the rest) -> a shape over MESH_AXES whose
    product is `num_devices`; a clear error otherwise."""
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    rest = [i for i, n in enumerate(shape) if n == -1]
    if len(rest) > 1 or any(n == 0 or n < -1 for n in shape):
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: each must be >= 1, and at most one -1")
    fixed = math.prod(n for n in shape if n != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not a multiple "
                             f"of {fixed}")
        shape[rest[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, shape))} need {math.prod(shape)} devices, "
                         f"there are {num_devices}")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int] | None = None, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes). On several slices
    (TPU multi-slice) the data axis spans the slices, the others stay inside one; otherwise the device order
    follows the physical topology (`mesh_utils.create_device_mesh`)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes or {"fsdp": -1}, len(devices))
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        n = len(slices)
        if shape[0] % n:
            raise ValueError(f"{n} slices: the data axis ({shape[0]}) must be a multiple of the slice count")
        grid = mesh_utils.create_hybrid_device_mesh((shape[0] // n,) + shape[1:], (n, 1, 1), devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):  # topologies it does not know (CPU, some GPUs)
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _spec(shape, logical, mesh: Mesh) -> PartitionSpec:
    return fit_spec(shape, mesh_axes_of(logical), dict(mesh.shape))


def param_shardings(boxed_tree, mesh: Mesh, report: list | None = None):
    """Tree of NamedShardings for a tree of `nn.Partitioned` (abstract or real) parameters, by their logical
    names. Leaves without names are replicated. `report`, if given, receives a line for every dimension left
    unsharded because its mesh axes do not divide it."""
    def one(path, leaf):
        if isinstance(leaf, nn.Partitioned):
            shape, names = leaf.value.shape, leaf.names
        else:
            shape, names = np.shape(leaf), (None,) * np.ndim(leaf)
        spec = _spec(shape, names, mesh)
        if report is not None:
            wanted = mesh_axes_of(names)
            for d, (w, got) in enumerate(zip(wanted, tuple(spec) + (None,) * (len(shape) - len(spec)))):
                if w is not None and got is None:
                    report.append(f"{jax.tree_util.keystr(path)} dim {d} ({shape[d]}, {names[d]!r}) not divisible "
                                  f"by mesh axes {w}; kept unsharded")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Rows (the leading dim) over the batch axes (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(mesh_axes_of(BATCH_AXES)[0], *([None] * (ndim - 1))))


def batch_rows_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this (the product of the batch mesh axes)."""
    axes = mesh_axes_of(BATCH_AXES)[0]
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def global_batch(local_batch, mesh: Mesh):
    """This process's rows -> global arrays sharded over the batch axes. On one process the rows are the whole
    batch; on several, each process passes only its own rows (in process order) and nothing is copied across
    hosts."""
    def one(a):
        a = np.asarray(a)
        rows = a.shape[0] * jax.process_count()
        if rows % batch_rows_divisor(mesh):
            raise ValueError(f"global batch of {rows} rows is not divisible by the batch mesh axes "
                             f"({batch_rows_divisor(mesh)} = data x fsdp)")
        sharding = batch_sharding(mesh, a.ndim)
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        return jax.make_array_from_process_local_data(sharding, a, (rows,) + a.shape[1:])

    return jax.tree.map(one, local_batch)


def bytes_per_device(tree) -> dict[Any, int]:
    """Bytes each device holds of a tree of jax.Arrays (read from their shards)."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
