"""The M3 model: layers, attention, the XLM-R encoder, the three heads, the reranker's
classification head, RetroMAE's MLM head and decoder, and the params as data."""

from m3_jax.model.abstract import (
    Params,
    abstract_params,
    check_params,
    graphdef,
    init_params,
    layers_stacked,
    logical_axes,
    model_from_params,
    params_in_layout,
    per_layer,
)
from m3_jax.model.encoder import Encoder, roberta_position_ids
from m3_jax.model.m3 import M3Model, M3Output
from m3_jax.model.reranker import RerankerModel
from m3_jax.model.retromae import RetroMAEModel

__all__ = [
    "Encoder",
    "M3Model",
    "M3Output",
    "Params",
    "RerankerModel",
    "RetroMAEModel",
    "abstract_params",
    "check_params",
    "graphdef",
    "init_params",
    "layers_stacked",
    "logical_axes",
    "model_from_params",
    "params_in_layout",
    "per_layer",
    "roberta_position_ids",
]
