"""The three M3 representations computed from the encoder's last hidden state.

Shapes: hidden [batch, length, hidden], input_ids / attention_mask [batch, length].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m3_jax.model.layers import Dense

NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(||x||, 1e-12) along the last axis, in float32; zero rows stay zero."""
    x = x.astype(jnp.float32)
    # sqrt(max(|x|^2, eps^2)) == max(|x|, eps), with a finite gradient at zero rows (padding):
    # the derivative of sqrt at 0 is infinite, and 0 * inf would make NaN gradients.
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sum_sq, NORM_EPS**2))


def dense_embedding(
    hidden: jax.Array, normalize: bool, pool_mask: jax.Array | None = None
) -> jax.Array:
    """[batch, hidden]: the [CLS] state, or the mean of the states where `pool_mask` (MCLS)."""
    if pool_mask is None:
        pooled = hidden[:, 0].astype(jnp.float32)
    else:
        weights = pool_mask.astype(jnp.float32)
        pooled = jnp.einsum("bl,bld->bd", weights, hidden.astype(jnp.float32))
        pooled = pooled / jnp.maximum(weights.sum(-1, keepdims=True), 1.0)
    return l2_normalize(pooled) if normalize else pooled


def sparse_weights(
    hidden: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    sparse_linear: Dense,
    special_token_ids: tuple[int, ...],
) -> jax.Array:
    """[batch, length]: relu(w·h + b) per token; 0 at padding and at special ids (cls/eos/pad/unk)."""
    weights = jax.nn.relu(sparse_linear(hidden)[..., 0].astype(jnp.float32))
    keep = attention_mask.astype(bool)
    for token_id in special_token_ids:
        keep = keep & (input_ids != token_id)
    return jnp.where(keep, weights, 0.0)


def colbert_vectors(
    hidden: jax.Array, attention_mask: jax.Array, colbert_linear: Dense, normalize: bool
) -> tuple[jax.Array, jax.Array]:
    """([batch, length-1, dim], [batch, length-1]): projected states of positions 1.., pads zeroed.

    The mask is applied before normalisation, as in FlagEmbedding, so padded rows are exact zeros.
    """
    mask = attention_mask[:, 1:]
    vectors = colbert_linear(hidden[:, 1:]).astype(jnp.float32) * mask[..., None]
    if normalize:
        vectors = l2_normalize(vectors)
    return vectors, mask.astype(bool)
