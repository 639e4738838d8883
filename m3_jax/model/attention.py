"""Scaled dot-product attention behind one switch: "xla", "chunked" and "cudnn".

All take q, k, v as [batch, length, heads, head_dim] and a key padding mask [batch, length]
(True = real token) and return [batch, length, heads, head_dim]. Scores and softmax run in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m3_jax.model.layers import dropout


def _masked_softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    # Padded keys get the dtype minimum, like transformers' additive mask.
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = dropout(probs, dropout_rate, dropout_rng).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def xla_attention(q, k, v, key_mask, *, dropout_rate=0.0, dropout_rng=None):
    """Materialises the full [batch, heads, L, L] score tensor: fastest for short inputs."""
    return _masked_softmax_attention(q, k, v, key_mask, dropout_rate, dropout_rng)


def chunked_attention(q, k, v, key_mask, *, chunk_size, dropout_rate=0.0, dropout_rng=None):
    """Processes query blocks of `chunk_size` one after another.

    Peak score memory is [batch, heads, chunk_size, L] instead of [batch, heads, L, L], so an
    8192-token input needs 16x less attention memory with the default 512-token blocks.
    """
    batch, length, heads, head_dim = q.shape
    if length <= chunk_size:
        return _masked_softmax_attention(q, k, v, key_mask, dropout_rate, dropout_rng)
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size
    q = jnp.pad(q, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    q_chunks = q.reshape(batch, num_chunks, chunk_size, heads, head_dim).swapaxes(0, 1)

    def one_chunk(args):
        index, q_chunk = args
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        return _masked_softmax_attention(q_chunk, k, v, key_mask, dropout_rate, rng)

    out = jax.lax.map(one_chunk, (jnp.arange(num_chunks), q_chunks))
    return out.swapaxes(0, 1).reshape(batch, padded, heads, head_dim)[:, :length]


def cudnn_attention(q, k, v, key_mask, *, dropout_rate=0.0, dropout_rng=None):
    """cuDNN fused (flash) attention through `jax.nn.dot_product_attention`; GPU, fp16/bf16 only."""
    if dropout_rng is not None and dropout_rate > 0.0:
        raise ValueError(
            "attention_impl='cudnn' does not support attention dropout; "
            "set attention_probs_dropout_prob=0 or use attention_impl='xla'"
        )
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"attention_impl='cudnn' needs a GPU backend, but JAX runs on "
            f"{jax.default_backend()!r}; use attention_impl='xla' or 'chunked'"
        )
    mask = key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def attention(q, k, v, key_mask, *, impl, chunk_size, dropout_rate=0.0, dropout_rng=None):
    """Dispatches on `impl` (ModelConfig.attention_impl)."""
    if impl == "xla":
        return xla_attention(q, k, v, key_mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl == "chunked":
        return chunked_attention(
            q,
            k,
            v,
            key_mask,
            chunk_size=chunk_size,
            dropout_rate=dropout_rate,
            dropout_rng=dropout_rng,
        )
    if impl == "cudnn":
        return cudnn_attention(
            q, k, v, key_mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng
        )
    raise ValueError(f"unknown attention impl {impl!r}")
