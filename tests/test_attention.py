"""Attention implementations: xla against numpy; chunked and the splash kernel (interpret mode)
against xla; fused kernels falling back with a reason where they cannot run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3_jax.config import tiny
from m3_jax.model import model_from_params
from m3_jax.model.attention import (
    attention,
    chunked_attention,
    splash_attention,
    unsupported_reason,
    xla_attention,
)
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


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_fused_kernel_falls_back_to_chunked_with_a_reason(impl, caplog):
    q, k, v, key_mask = random_qkv(2, length=20)
    want = np.asarray(attention(q, k, v, key_mask, impl="chunked", chunk_size=8))
    with caplog.at_level("WARNING", logger="m3_jax.model.attention"):
        got = np.asarray(attention(q, k, v, key_mask, impl=impl, chunk_size=8))
    np.testing.assert_array_equal(got, want)
    backend = jax.default_backend()
    assert unsupported_reason(impl, jnp.asarray(q), False) is not None
    if backend not in ("gpu", "tpu"):
        assert f"falls back to 'chunked' here: {'cuDNN' if impl == 'cudnn' else 'splash'}" in (
            caplog.text
        )
    # Through the model (a full trace, not an XLA failure).
    config = tiny(vocab_size=50, attention_impl=impl)
    model = model_from_params(config, random_params(config))
    ids = jnp.full((1, 8), 5, jnp.int32)
    assert jax.eval_shape(lambda: model(ids, jnp.ones_like(ids))).dense.shape == (1, 64)


def test_unsupported_reasons():
    bf16 = jnp.zeros((1, 256, 2, 8), jnp.bfloat16)
    backend = jax.default_backend()
    if backend != "gpu":
        assert "needs a GPU" in unsupported_reason("cudnn", bf16, False)
    if backend != "tpu":
        assert "needs a TPU" in unsupported_reason("splash", bf16, False)
    if backend == "gpu":
        assert "bfloat16/float16" in unsupported_reason("cudnn", bf16.astype(jnp.float32), False)
        assert "dropout" in unsupported_reason("cudnn", bf16, True)
        assert unsupported_reason("cudnn", bf16, False) is None


def splash_case(seed, batch, length, heads):
    q, k, v, key_mask = random_qkv(seed, batch=batch, length=length, heads=heads, head_dim=16)
    key_mask[1, 100:] = False  # padding inside the second block
    return (jnp.asarray(x) for x in (q, k, v, key_mask))


def masked_sum(fn, key_mask):
    """A scalar of the real query rows only (padding rows differ by design)."""
    return lambda q, k, v: (fn(q, k, v) * key_mask[:, :, None, None]).sum()


def test_splash_kernel_equals_xla_forward_and_backward():
    """The Pallas kernel in interpret mode (TPU lowering is not available here)."""
    q, k, v, key_mask = splash_case(4, batch=2, length=256, heads=2)
    splash = jax.jit(lambda q, k, v: splash_attention(q, k, v, key_mask, interpret=True))
    xla = jax.jit(lambda q, k, v: xla_attention(q, k, v, key_mask))
    real = np.asarray(key_mask)
    np.testing.assert_allclose(
        np.asarray(splash(q, k, v))[real], np.asarray(xla(q, k, v))[real], **TOL
    )
    grads = jax.grad(masked_sum(splash, key_mask), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(masked_sum(xla, key_mask), argnums=(0, 1, 2))(q, k, v)
    for got, ref in zip(grads, want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_splash_under_a_mesh_runs_per_device():
    from m3_jax.sharding import make_mesh

    q, k, v, key_mask = splash_case(5, batch=4, length=128, heads=4)
    want = np.asarray(xla_attention(q, k, v, key_mask))
    mesh = make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: splash_attention(*a, interpret=True))(q, k, v, key_mask)
    real = np.asarray(key_mask)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], **TOL)


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
