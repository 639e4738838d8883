"""The names the model uses to describe how its arrays may be split over devices.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `colbert`);
`m3_jax.sharding` maps them to mesh axes with rules from the config. Activations are split over
the data-parallel mesh axes `BATCH_AXES` whenever a mesh with those axes is set.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

LOGICAL_AXES = ("vocab", "embed", "heads", "kv", "mlp", "colbert")
BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch is split over
TENSOR_AXIS = "tensor"  # the mesh axis attention heads and MLP columns may be split over

Axes = tuple[str | None, ...]


def constrain_batch(x: jax.Array, batch_axis: int = 0) -> jax.Array:
    """Keeps activation `x` split over the data-parallel axes along `batch_axis` when a mesh with
    those axes is set (`jax.set_mesh`); a no-op otherwise (inference, single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    spec = [None] * x.ndim
    spec[batch_axis] = BATCH_AXES
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
