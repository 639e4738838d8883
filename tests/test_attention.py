"""Attention implementations: xla against numpy, chunked against xla, cudnn's CPU error."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3_jax.config import tiny
from m3_jax.model.attention import attention, chunked_attention, cudnn_attention, xla_attention
from m3_jax.model_dir import model_from_params
from m3_jax.tiny import random_params

TOL = dict(rtol=1e-5, atol=1e-6)


def ref_attention(q, k, v, key_mask):
    """Plain numpy softmax(q k^T / sqrt(d)) v over real keys only (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(key_mask[:, None, None, :], scores, -np.inf)
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def random_qkv(seed, batch=3, length=37, heads=2, head_dim=8):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(batch, length, heads, head_dim)).astype(np.float32) for _ in "qkv")
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length  # one row without padding
    key_mask = np.arange(length)[None, :] < lengths[:, None]
    return q, k, v, key_mask


def test_xla_attention_matches_numpy():
    q, k, v, key_mask = random_qkv(0)
    got = np.asarray(jax.jit(xla_attention)(q, k, v, key_mask))
    np.testing.assert_allclose(got, ref_attention(q, k, v, key_mask), **TOL)


@pytest.mark.parametrize("length, chunk_size", [(37, 8), (37, 16), (40, 8), (12, 16), (5, 1)])
def test_chunked_equals_xla(length, chunk_size):
    q, k, v, key_mask = random_qkv(length + chunk_size, length=length)
    xla = np.asarray(jax.jit(xla_attention)(q, k, v, key_mask))
    chunked_fn = jax.jit(lambda *a: chunked_attention(*a, chunk_size=chunk_size))
    chunked = np.asarray(chunked_fn(q, k, v, key_mask))
    assert chunked.shape == xla.shape
    np.testing.assert_allclose(chunked, xla, rtol=1e-6, atol=1e-6)
    # Real query rows also match the numpy reference.
    ref = ref_attention(q, k, v, key_mask)
    np.testing.assert_allclose(chunked, ref, **TOL)


def test_dispatch_and_unknown_impl():
    q, k, v, key_mask = random_qkv(1, length=20)
    a = attention(q, k, v, key_mask, impl="chunked", chunk_size=6)
    b = attention(q, k, v, key_mask, impl="xla", chunk_size=6)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, key_mask, impl="flash", chunk_size=6)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-GPU error")
def test_cudnn_off_gpu_raises_clear_error():
    q, k, v, key_mask = random_qkv(2, length=8)
    with pytest.raises(ValueError, match="needs a GPU backend"):
        cudnn_attention(q, k, v, key_mask)
    with pytest.raises(ValueError, match="needs a GPU backend"):
        attention(q, k, v, key_mask, impl="cudnn", chunk_size=4)
    with pytest.raises(ValueError, match="does not support attention dropout"):
        cudnn_attention(q, k, v, key_mask, dropout_rate=0.1, dropout_rng=jax.random.key(0))
    # Through the model: a clear error, not an XLA failure.
    config = tiny(vocab_size=50, attention_impl="cudnn")
    model = model_from_params(config, random_params(config))
    ids = jnp.full((1, 8), 5, jnp.int32)
    with pytest.raises(ValueError, match="attention_impl='cudnn' needs a GPU"):
        jax.eval_shape(lambda: model(ids, jnp.ones_like(ids)))


def test_chunked_model_equals_xla_model():
    """Whole encoder with chunked attention (length not a multiple of the chunk, padding)."""
    config = tiny(vocab_size=60)
    params = random_params(config, 3)
    xla = model_from_params(config, params)
    chunked = model_from_params(
        config.replace(attention_impl="chunked", attention_chunk_size=8), params
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 60, size=(3, 21)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, 13:], mask[1, 13:] = 1, 0
    ids[2, 3:], mask[2, 3:] = 1, 0
    a, b = (nnx.jit(lambda m, i, k: m(i, k))(m, ids, mask) for m in (xla, chunked))
    for name in ("dense", "sparse", "colbert"):
        np.testing.assert_allclose(
            np.asarray(getattr(b, name)), np.asarray(getattr(a, name)), rtol=1e-5, atol=1e-6
        )
