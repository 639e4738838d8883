"""The train state and the train step laid out on a device mesh.

Params follow the logical-axis rules, the optimizer state mirrors the params it tracks, the step
counter and RNG are replicated, and batches are split over the data-parallel axes. The state is
built directly in its sharded layout (fresh init under `jit` with `out_shardings`; imported weights
copied slice by slice), so the full model never sits on one device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from m3_jax import sharding
from m3_jax.config import ModelConfig
from m3_jax.data.plan import BatchShape
from m3_jax.model import M3Model, Params, abstract_params, init_params
from m3_jax.model.abstract import ModelClass
from m3_jax.training.state import TrainState, abstract_state, init_state
from m3_jax.training.step import eval_loss, train_step


def state_shardings(
    config: ModelConfig,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: sharding.Rules,
    model_class: ModelClass = M3Model,
) -> TrainState:
    """A TrainState of `model_class` whose leaves are the NamedShardings of the real state's."""
    params = sharding.param_shardings(config, mesh, rules, model_class)
    float32 = config.replace(param_dtype="float32")
    abstract = abstract_state(abstract_params(float32, model_class), tx)
    return TrainState(
        step=sharding.replicated(mesh),
        params=params,
        opt_state=sharding.opt_state_shardings(
            tx, abstract.opt_state, params, sharding.replicated(mesh)
        ),
        rng=sharding.replicated(mesh),
    )


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings (what orbax restores onto)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def fresh_params(
    config: ModelConfig, seed: int, shardings: Any, model_class: ModelClass = M3Model
) -> Params:
    """A random float32 init of `model_class(config)`, each device computing only its slices."""

    float32 = config.replace(param_dtype="float32")
    return jax.jit(lambda: init_params(float32, seed, model_class), out_shardings=shardings)()


def initial_state(
    params: Params, tx: optax.GradientTransformation, seed: int, shardings: TrainState
) -> TrainState:
    """The step-0 state from sharded params; optimizer moments are created in place."""
    make = jax.jit(
        functools.partial(init_state, tx=tx, seed=seed),
        in_shardings=(shardings.params,),
        out_shardings=shardings,
    )
    return make(params)


def jit_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config: Any,
    shardings: TrainState,
    mesh: Mesh,
    step_fn: Callable = train_step,
) -> Any:
    """`step_fn` (the fine-tuning `train_step`, or RetroMAE's, with its `config`) under `jit`
    with the state's shardings in and out (donated), batches split over the data-parallel
    axes, and the lr and metrics replicated."""
    return jax.jit(
        functools.partial(step_fn, graphdef=graphdef, tx=tx, config=config),
        in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_step(
    graphdef: nnx.GraphDef,
    config: Any,
    shardings: TrainState,
    mesh: Mesh,
    eval_fn: Callable = eval_loss,
) -> Any:
    """`eval_fn` (loss parts, no dropout, no update) under `jit` on the same layouts."""
    return jax.jit(
        functools.partial(eval_fn, graphdef=graphdef, config=config),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


LR_SPEC = jax.ShapeDtypeStruct((), jnp.float32)  # train_step's learning-rate input


def batch_spec(shape: BatchShape, with_teacher: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of a bucket of static shape `shape`."""
    batch, q_len, p_len, group_size = shape[:4]
    spec = {
        "query_ids": jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
        "query_mask": jax.ShapeDtypeStruct((batch, q_len), jnp.int32),
        "passage_ids": jax.ShapeDtypeStruct((batch * group_size, p_len), jnp.int32),
        "passage_mask": jax.ShapeDtypeStruct((batch * group_size, p_len), jnp.int32),
    }
    if with_teacher:
        spec["teacher_scores"] = jax.ShapeDtypeStruct((batch, group_size), jnp.float32)
    return spec
