"""The model as data: its params pytree, abstract shapes, logical axes, and shape checks.

`Params` is the plain nested dict that optax, orbax, sharding and conversion all use
(`encoder/layers/0/attention/query/kernel`, ...). With `scan_layers` the layers are stacked
instead (`encoder/layers/attention/query/kernel` of shape [num_layers, ...]); model directories,
PyTorch checkpoints and conversion use the per-layer layout, and `params_in_layout` turns one into
the other where params cross that boundary. The abstract model is traced once per config
(`nnx.eval_shape`, seconds for the full geometry) and cached; everything that needs shapes,
dtypes, logical axes or the graph definition derives them from it.

Every function takes the model class: `M3Model` (the embedder, the default), `RerankerModel`
(the cross-encoder) or `RetroMAEModel` (pre-training), which share the encoder and differ in
their heads.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3_jax.config import ModelConfig
from m3_jax.model.m3 import M3Model
from m3_jax.model.reranker import RerankerModel
from m3_jax.model.retromae import RetroMAEModel

Params = dict[str, Any]


ModelClass = type[M3Model] | type[RerankerModel] | type[RetroMAEModel]


@functools.lru_cache(maxsize=16)
def abstract_model(config: ModelConfig, model_class: ModelClass = M3Model) -> nnx.Module:
    """`model_class(config)` with ShapeDtypeStructs for arrays: nothing allocated, traced once."""
    return nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))


def graphdef(config: ModelConfig, model_class: ModelClass = M3Model) -> nnx.GraphDef:
    """The static structure that `nnx.merge(graphdef, params)` turns back into a model."""
    return nnx.graphdef(abstract_model(config, model_class))


def abstract_params(config: ModelConfig, model_class: ModelClass = M3Model) -> Params:
    """The params pytree of `model_class(config)` as ShapeDtypeStructs."""
    return nnx.to_pure_dict(nnx.state(abstract_model(config, model_class), nnx.Param))


def logical_axes(config: ModelConfig, model_class: ModelClass = M3Model) -> Any:
    """The params pytree with each leaf replaced by its tuple of logical axis names."""
    names = jax.tree.map(
        lambda v: tuple(v.get_metadata()["out_sharding"]),
        nnx.state(abstract_model(config, model_class), nnx.Param),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.to_pure_dict(names)


def init_params(config: ModelConfig, seed: int, model_class: ModelClass = M3Model) -> Params:
    """A random init of `model_class(config)` (traceable: under `jit` with out_shardings each
    device computes only its own slices)."""
    model = model_class(config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def check_params(
    params: Params,
    config: ModelConfig,
    source: str,
    model_class: ModelClass = M3Model,
    part: str | None = None,
) -> None:
    """Errors naming every missing, unexpected or wrongly shaped parameter of `model_class`, or
    of its top-level subtree `part` (RetroMAE's "lm_head")."""
    reference = abstract_params(config, model_class)
    reference = reference if part is None else reference[part]
    expected = {
        jax.tree_util.keystr(path): leaf.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(reference)
    }
    got = {
        jax.tree_util.keystr(path): np.shape(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    problems = [f"missing {k}" for k in sorted(set(expected) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(expected))]
    problems += [
        f"{k} has shape {got[k]}, expected {expected[k]}"
        for k in sorted(set(got) & set(expected))
        if tuple(got[k]) != tuple(expected[k])
    ]
    if problems:
        raise ValueError(
            f"{source}: parameters do not fit the model config:\n  " + "\n  ".join(problems)
        )


def layers_stacked(params: Params) -> bool:
    """Whether the encoder layers in `params` are stacked (`scan_layers`) rather than indexed."""
    layers = params.get("encoder", {}).get("layers", {})
    return bool(layers) and not all(isinstance(k, int) for k in layers)


def _stack(leaves: list[Any]) -> Any:
    if all(isinstance(x, np.ndarray) for x in leaves):
        return np.stack(leaves)
    return jnp.stack(leaves)


def params_in_layout(params: Params, stacked: bool) -> Params:
    """`params` with the encoder layers stacked (as `scan_layers` models hold them) or one
    subtree per layer index (model directories, conversion); the same arrays, nothing else moves.
    Numpy leaves stay numpy; jax arrays (sharded ones too) stay on their devices."""
    if layers_stacked(params) == stacked or not params.get("encoder", {}).get("layers"):
        return params
    layers = params["encoder"]["layers"]
    if stacked:
        per_layer = [layers[i] for i in range(len(layers))]
        new_layers = jax.tree.map(lambda *leaves: _stack(list(leaves)), *per_layer)
    else:
        count = jax.tree.leaves(layers)[0].shape[0]
        new_layers = {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)}
    return {**params, "encoder": {**params["encoder"], "layers": new_layers}}


def per_layer(config: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """(config, params) in the per-layer layout that files and conversion mappings use."""
    return config.replace(scan_layers=False), params_in_layout(params, stacked=False)


def model_from_params(
    config: ModelConfig, params: Params, model_class: ModelClass = M3Model
) -> nnx.Module:
    """A `model_class` holding `params` (cast to config.param_dtype; either layer layout), after
    a full shape check."""
    params = params_in_layout(params, config.scan_layers)
    check_params(params, config, "params", model_class)
    state = nnx.state(abstract_model(config, model_class))
    dtype = jnp.dtype(config.param_dtype)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
    return nnx.merge(graphdef(config, model_class), state)
