"""Device mesh, logical-axis rules and the shardings of params, optimizer state and batches.

The mesh has three axes, `("data", "fsdp", "tensor")`. Batches are split over `("data", "fsdp")`
(so one `jit` over the global batch gives in-batch negatives across every device); parameters are
split by rules that map each logical axis name the model declares (`vocab`, `embed`, `heads`,
`kv`, `mlp`, `colbert`) to a mesh axis or to None (replicated). The default rules are FSDP:
`embed` over `fsdp`, heads and MLP over `tensor` (a no-op while `tensor` has size 1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The default rules live with the other defaults; sharding.FSDP_RULES is the same object.
from m3_jax.config import FSDP_RULES as FSDP_RULES
from m3_jax.config import DistributedConfig, MeshConfig, ModelConfig
from m3_jax.model import M3Model, abstract_params, logical_axes
from m3_jax.model.abstract import ModelClass
from m3_jax.model.axes import BATCH_AXES, TENSOR_AXIS

log = logging.getLogger(__name__)

MESH_AXES = (*BATCH_AXES, TENSOR_AXIS)

Rules = Sequence[tuple[str, str | Sequence[str] | None]]

# Mesh --------------------------------------------------------------------------------------------


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with one -1 filled so that the product is `num_devices`."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {tuple(sizes)}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh sizes {tuple(sizes)} do not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {math.prod(sizes)} devices, "
            f"but {num_devices} are available; set one size to -1 to fill the rest"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(
    data: int = 1,
    fsdp: int = -1,
    tensor: int = 1,
    *,
    dcn_data: int = 1,
    dcn_fsdp: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all of them).

    data/fsdp/tensor are the sizes within a slice (ICI); dcn_data/dcn_fsdp multiply the data and
    fsdp axes across slices (multi-slice TPU over the data-centre network). Axes are Auto, so
    the rest of the program is GSPMD with sharding annotations.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = (dcn_data, dcn_fsdp, 1)
    if dcn_data < 1 or dcn_fsdp < 1:
        raise ValueError(f"dcn sizes must be positive, got dcn_data={dcn_data} dcn_fsdp={dcn_fsdp}")
    per_slice = len(devices) // math.prod(dcn)
    if per_slice * math.prod(dcn) != len(devices):
        raise ValueError(f"{len(devices)} devices do not split into {math.prod(dcn)} slices")
    ici = resolve_mesh_shape(data, fsdp, tensor, per_slice)
    if math.prod(dcn) > 1:
        # TPU devices know their slice; elsewhere (multi-node GPU) each process is a granule.
        by_process = not hasattr(devices[0], "slice_index")
        granules = {d.process_index if by_process else d.slice_index for d in devices}
        if len(granules) != math.prod(dcn):
            kind = "processes" if by_process else "slices"
            raise ValueError(
                f"dcn_data x dcn_fsdp = {math.prod(dcn)} needs as many {kind}; "
                f"the devices come from {len(granules)}"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=by_process
        )
    else:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(config: MeshConfig) -> Mesh:
    return make_mesh(
        config.data,
        config.fsdp,
        config.tensor,
        dcn_data=config.dcn_data,
        dcn_fsdp=config.dcn_fsdp,
    )


def data_parallel_size(mesh: Mesh) -> int:
    """How many blocks the global batch is split into."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def initialize_distributed(config: DistributedConfig) -> None:
    """`jax.distributed.initialize` for a multi-process run; call it before anything touches a
    backend. Unset fields (empty, 0, -1) are left to JAX, which detects TPU pods, SLURM, ..."""
    if jax.distributed.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    if config.coordinator_address:
        kwargs["coordinator_address"] = config.coordinator_address
    if config.num_processes > 0:
        kwargs["num_processes"] = config.num_processes
    if config.process_id >= 0:
        kwargs["process_id"] = config.process_id
    jax.distributed.initialize(**kwargs)


# Logical axes → partition specs ------------------------------------------------------------------


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def spec_for(
    axes: tuple[str | None, ...], shape: tuple[int, ...], rules: Rules, mesh_shape: dict[str, int]
) -> PartitionSpec:
    """The PartitionSpec of one array with logical `axes`; a dimension that its mesh axes do not
    divide is replicated (logged), and an unknown logical name is an error."""
    table = dict(rules)
    spec: list[Any] = []
    used: set[str] = set()
    for name, size in zip(axes, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(
                f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}"
            )
        target = table[name]
        mesh_axes = () if target is None else (target,) if isinstance(target, str) else target
        for axis in mesh_axes:
            if axis not in mesh_shape:
                raise ValueError(f"rule {name!r} -> {axis!r}: mesh axes are {list(mesh_shape)}")
            if axis in used:
                raise ValueError(f"mesh axis {axis!r} used twice in one array's axes {axes}")
        ways = math.prod(mesh_shape[a] for a in mesh_axes)
        if ways > 1 and size % ways:
            log.info("%s of size %d does not split %d ways; replicated", name, size, ways)
            mesh_axes = ()
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def param_specs(
    config: ModelConfig,
    rules: Rules,
    mesh_shape: dict[str, int],
    model_class: ModelClass = M3Model,
) -> Any:
    """PartitionSpecs for the params pytree of `model_class(config)`."""
    shapes = abstract_params(config, model_class)
    return jax.tree.map(
        lambda axes, leaf: spec_for(axes, leaf.shape, rules, mesh_shape),
        logical_axes(config, model_class),
        shapes,
        is_leaf=_is_axes,
    )


def param_shardings(
    config: ModelConfig, mesh: Mesh, rules: Rules, model_class: ModelClass = M3Model
) -> Any:
    specs = param_specs(config, rules, dict(mesh.shape), model_class)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def opt_state_shardings(
    tx: optax.GradientTransformation, abstract_opt_state: Any, params_layout: Any, other: Any
) -> Any:
    """The optimizer state's layout: each params-shaped part (Adam moments) laid out like the
    params (`params_layout`), every other leaf (step counts) given `other`."""
    return optax.tree_map_params(
        tx,
        lambda _, layout: layout,
        abstract_opt_state,
        params_layout,
        transform_non_params=lambda _: other,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 (queries, or their passages) split over the data-parallel axes."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_global(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same on every process) → global arrays; each device takes only its slice,
    so the whole tree never sits on one device. `shardings`: one per leaf, or one for all."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


# Memory accounting -------------------------------------------------------------------------------


def shard_shape(
    shape: tuple[int, ...], spec: PartitionSpec, mesh_shape: dict[str, int]
) -> tuple[int, ...]:
    """The per-device block of an array of `shape` laid out by `spec` on a mesh of `mesh_shape`."""
    out = []
    for i, size in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(-(-size // math.prod(mesh_shape[a] for a in axes)))
    return tuple(out)


def bytes_per_device(abstract_tree: Any, specs: Any, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of `abstract_tree` (ShapeDtypeStructs) laid out by `specs`."""
    leaves = jax.tree.leaves(abstract_tree)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    if len(leaves) != len(spec_leaves):
        raise ValueError(f"{len(leaves)} arrays but {len(spec_leaves)} specs")
    return sum(
        math.prod(shard_shape(leaf.shape, spec, mesh_shape)) * jnp.dtype(leaf.dtype).itemsize
        for leaf, spec in zip(leaves, spec_leaves, strict=True)
    )
