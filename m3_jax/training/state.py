"""The train state: a plain pytree (params as a nested dict) that optax, orbax and shardings use."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from m3_jax.model import Params


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Params
    opt_state: optax.OptState
    rng: jax.Array  # base key; step t uses fold_in(rng, t), so resuming needs only `step`

    def dropout_key(self) -> jax.Array:
        """The dropout key of the step this state is about to take."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def init_state(params: Params, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def abstract_state(params: Params, tx: optax.GradientTransformation) -> Any:
    """ShapeDtypeStructs of the state, for restoring a checkpoint without building it first."""
    return jax.eval_shape(lambda p: init_state(p, tx, 0), params)
