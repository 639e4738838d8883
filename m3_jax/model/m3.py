"""M3Model: the XLM-R encoder plus the dense, sparse and colbert heads in one forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from m3_jax.config import ModelConfig
from m3_jax.model.encoder import Encoder
from m3_jax.model.heads import colbert_vectors, dense_embedding, sparse_weights
from m3_jax.model.layers import Dense


@struct.dataclass
class M3Output:
    """Float32 outputs of one forward pass over [batch, length] inputs."""

    dense: jax.Array  # [batch, hidden], L2-normalised [CLS] (or MCLS mean)
    sparse: jax.Array  # [batch, length], per-token lexical weight, 0 at pads/specials
    colbert: jax.Array  # [batch, length-1, colbert_dim], positions 1.., 0 at pads
    colbert_mask: jax.Array  # [batch, length-1] bool, True where colbert rows are real


class M3Model(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        dt = dict(param_dtype=jnp.dtype(config.param_dtype), dtype=jnp.dtype(config.dtype))
        std = config.initializer_range
        e = config.hidden_size
        self.encoder = Encoder(config, rngs=rngs)
        self.colbert_linear = Dense(
            (e,), (config.colbert_out_dim,), ("embed",), ("colbert",), stddev=std, rngs=rngs, **dt
        )
        self.sparse_linear = Dense((e,), (1,), ("embed",), (None,), stddev=std, rngs=rngs, **dt)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        *,
        dropout_rng: jax.Array | None = None,
        dense_pool_mask: jax.Array | None = None,
    ) -> M3Output:
        """`dropout_rng` turns on training-mode dropout; `dense_pool_mask` [batch, length] marks the
        [CLS] tokens to average for MCLS (None: position 0 only)."""
        config = self.config
        hidden = self.encoder(input_ids, attention_mask, dropout_rng=dropout_rng)
        colbert, colbert_mask = colbert_vectors(
            hidden, attention_mask, self.colbert_linear, config.normalize_embeddings
        )
        return M3Output(
            dense=dense_embedding(hidden, config.normalize_embeddings, dense_pool_mask),
            sparse=sparse_weights(
                hidden, input_ids, attention_mask, self.sparse_linear, config.special_token_ids
            ),
            colbert=colbert,
            colbert_mask=colbert_mask,
        )
