"""Device meshes and shardings: batch over ('data', 'fsdp'), frozen weights over 'fsdp', LoRA replicated.

Every mesh has the three axes ``data``, ``fsdp`` and ``tensor`` (size 1 where unused), so the
models' logical-axis rules (:data:`flaxlora.models.LOGICAL_AXIS_RULES`) always resolve. On
several hosts, build the mesh after ``jax.distributed.initialize()``; it spans all devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxlora.data.batching import BATCH_DTYPES, TOKEN_KEYS
from flaxlora.models import LOGICAL_AXIS_RULES, init_params, logical_partition_specs
from flaxlora.pytree import PyTree

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def parse_mesh(spec: str | Mapping[str, int] | None, n_devices: int) -> dict[str, int]:
    """Axis sizes from ``"data=4,fsdp=2"`` (one size may be -1: the rest); default all on data.

    Raises ValueError naming the problem for unknown axes, bad sizes or a device-count mismatch.
    """
    if spec is None or spec == "":
        return {"data": n_devices, "fsdp": 1, "tensor": 1}
    if isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            name, sep, value = part.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"mesh spec {spec!r}: expected 'axis=size[,axis=size]', got {part!r}")
            sizes[name.strip()] = int(value)
    else:
        sizes = dict(spec)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh spec {spec!r}: unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    if list(sizes.values()).count(-1) > 1 or any(v == 0 or v < -1 for v in sizes.values()):
        raise ValueError(f"mesh spec {spec!r}: sizes must be positive (at most one -1)")
    known = math.prod(v for v in sizes.values() if v != -1)
    for name, value in sizes.items():
        if value == -1:
            sizes[name] = n_devices // known
    full = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if math.prod(full.values()) != n_devices:
        raise ValueError(f"mesh {full} needs {math.prod(full.values())} devices, {n_devices} available")
    return full


def make_mesh(
    spec: str | Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
    dcn: str | Mapping[str, int] | None = None,
) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over ``devices`` (default: all devices, all hosts).

    ``jax.make_mesh`` orders the devices by the physical topology (TPU/GPU interconnect). ``dcn``
    spans several slices (multi-slice TPU over the data-center network) or, on hosts without
    slices, several processes: ``spec`` then sizes the axes within one slice (process) and ``dcn``
    across them, each axis being their product (``--mesh fsdp=4 --dcn-mesh data=2``: data over
    the 2 slices, fsdp within each), through ``mesh_utils.create_hybrid_device_mesh``.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not dcn:
        sizes = parse_mesh(spec, len(devices))
        return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                             devices=devices)
    by_slice = devices[0].platform == "tpu"  # TPU slices; elsewhere processes (hosts)
    granules = len({d.slice_index if by_slice else d.process_index for d in devices})
    try:
        across = parse_mesh(dcn, granules)
    except ValueError as err:
        raise ValueError(f"dcn mesh {dcn!r} spans the {granules} {'slices' if by_slice else 'processes'}: {err}") from None
    within = parse_mesh(spec, len(devices) // granules)
    grid = mesh_utils.create_hybrid_device_mesh([within[a] for a in MESH_AXES], [across[a] for a in MESH_AXES], devices,
                                                process_is_granule=not by_slice)
    return Mesh(grid, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop the mesh axes of any dimension they do not divide (that dimension is replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return P(*fitted)


def logical_shardings(params: PyTree, logical_specs: PyTree, mesh: Mesh, rules) -> PyTree:
    """NamedSharding per leaf of ``params`` from its logical PartitionSpec and ``rules``."""
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
        params,
        mesh_specs,
        is_leaf=lambda s: isinstance(s, P),
    )


def param_shardings(model: nn.Module, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> PyTree:
    """NamedSharding per param of ``model`` (a :mod:`flaxlora.models` module) on ``mesh``, from its
    logical axes; computed abstractly (nothing is allocated)."""
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return logical_shardings(shapes, logical_partition_specs(model), mesh, rules)


def batch_spec(mesh: Mesh, batch_size: int, length: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and shardings of a (batch_size, length) batch as :func:`global_batch`
    places it: what a step is compiled for ahead of its first batch."""
    shapes = {key: (batch_size, length) if key in TOKEN_KEYS else (batch_size,) for key in BATCH_DTYPES}
    return {key: jax.ShapeDtypeStruct(shape, BATCH_DTYPES[key], sharding=batch_sharding(mesh))
            for key, shape in shapes.items()}


def global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a global batch, which every process holds whole, sharded over the batch axes.

    Each process copies only the rows its own devices hold, whatever the mesh: with a batch
    axis spanning processes they hold different rows; where a process's devices replicate the
    batch (e.g. ``tensor=8`` over 2 processes) every process feeds the same rows, as JAX needs.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda index, v=np.asarray(v): v[index])
            for k, v in batch.items()}
