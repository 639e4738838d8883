"""Scaled dot-product attention behind one switch: "xla", "chunked", "cudnn" and "splash".

All take q, k, v as [batch, length, heads, head_dim] and a key padding mask [batch, length]
(True = real token) and return [batch, length, heads, head_dim]. Scores and softmax run in float32.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from m3_jax.model.axes import BATCH_AXES, TENSOR_AXIS
from m3_jax.model.layers import dropout

log = logging.getLogger(__name__)


def masked_softmax_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    dropout_rate: float,
    dropout_rng: jax.Array | None,
) -> jax.Array:
    """The reference computation. key_mask: [batch, Lk] (the same keys for every query) or
    [batch, Lq, Lk] (a mask per query, as RetroMAE's decoder has); True = attended."""
    # Scaling q (not the scores) touches L x head_dim values instead of L x L; exact when
    # sqrt(head_dim) is a power of two (64 in XLM-R).
    q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    # transformers' additive mask: padded keys get the float32 minimum (an all-padding row ends
    # up uniform). Adding a [batch, 1, 1, L] bias fuses better on CPU than a select.
    bias = jnp.where(key_mask, 0.0, jnp.finfo(jnp.float32).min)
    scores = scores + (bias[:, None, None, :] if bias.ndim == 2 else bias[:, None])
    # Softmax with the normalisation after the value product, in [batch, heads, L, head_dim]
    # layout: it divides L x head_dim values instead of L x L. Dropout is elementwise, so it
    # commutes with the normalisation; the max shift cancels mathematically, so its gradient is
    # dropped.
    weights = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    total = weights.sum(-1, keepdims=True)
    weights = dropout(weights, dropout_rate, dropout_rng).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bhqd", weights, v, preferred_element_type=jnp.float32)
    return (out / total).astype(v.dtype).transpose(0, 2, 1, 3)


def xla_attention(q, k, v, key_mask, *, dropout_rate=0.0, dropout_rng=None):
    """Materialises the full [batch, heads, L, L] score tensor: fastest for short inputs."""
    return masked_softmax_attention(q, k, v, key_mask, dropout_rate, dropout_rng)


def chunked_attention(q, k, v, key_mask, *, chunk_size, dropout_rate=0.0, dropout_rng=None):
    """Processes query blocks of `chunk_size` one after another.

    Peak score memory is [batch, heads, chunk_size, L] instead of [batch, heads, L, L], so an
    8192-token input needs 16x less attention memory with the default 512-token blocks.
    """
    batch, length, heads, head_dim = q.shape
    if length <= chunk_size:
        return masked_softmax_attention(q, k, v, key_mask, dropout_rate, dropout_rng)
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size
    q = jnp.pad(q, ((0, 0), (0, padded - length), (0, 0), (0, 0)))
    q_chunks = q.reshape(batch, num_chunks, chunk_size, heads, head_dim).swapaxes(0, 1)

    def one_chunk(args):
        index, q_chunk = args
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, index)
        return masked_softmax_attention(q_chunk, k, v, key_mask, dropout_rate, rng)

    out = jax.lax.map(one_chunk, (jnp.arange(num_chunks), q_chunks))
    return out.swapaxes(0, 1).reshape(batch, padded, heads, head_dim)[:, :length]


def cudnn_attention(q, k, v, key_mask, *, dropout_rate=0.0, dropout_rng=None):
    """cuDNN fused (flash) attention through `jax.nn.dot_product_attention`; GPU, fp16/bf16.

    Padding is on the right, so the key mask is passed as per-row key lengths, which cuDNN
    applies inside the kernel (no [batch, 1, L, L] mask in memory)."""
    del dropout_rate, dropout_rng  # unsupported_reason() routes dropout elsewhere
    lengths = jnp.maximum(key_mask.sum(-1, dtype=jnp.int32), 1)  # all-padding rows stay finite
    return jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"
    )


SPLASH_BLOCK = 128  # splash kernels tile queries and keys in blocks of this many tokens


def splash_attention(q, k, v, key_mask, *, dropout_rate=0.0, dropout_rng=None, interpret=False):
    """Pallas splash (flash) attention for TPU; `interpret=True` runs the kernel on any backend.

    Real tokens are segment 1 and padding segment 0, so a real query sees exactly the real keys.
    Under a mesh (`jax.set_mesh`) each device runs the kernel on its batch rows and heads.
    """
    del dropout_rate, dropout_rng  # unsupported_reason() routes dropout elsewhere
    # The TPU kernel's modules load Pallas (0.3 s), which only a splash run needs.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, length, heads, head_dim = q.shape
    block = min(SPLASH_BLOCK, length)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mesh = jax.sharding.get_abstract_mesh()
    sharded = not mesh.empty and set(BATCH_AXES) | {TENSOR_AXIS} <= set(mesh.axis_names)
    local_heads = heads // mesh.shape[TENSOR_AXIS] if sharded else heads
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([sm.FullMask((length, length))] * local_heads),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=sizes,
        interpret=interpret,
    )

    def run(q, k, v, segments):
        def one(q, k, v, s):  # [heads, length, head_dim] for one text
            return kernel(q, k, v, segment_ids=sk.SegmentIds(q=s, kv=s))

        heads_first = (x.swapaxes(1, 2) for x in (q * head_dim**-0.5, k, v))
        return jax.vmap(one)(*heads_first, segments).swapaxes(1, 2)

    segments = key_mask.astype(jnp.int32)
    if not sharded:
        return run(q, k, v, segments)
    qkv_spec = P(BATCH_AXES, None, TENSOR_AXIS, None)
    return jax.shard_map(
        run,
        in_specs=(qkv_spec, qkv_spec, qkv_spec, P(BATCH_AXES, None)),
        out_specs=qkv_spec,
        check_vma=False,
    )(q, k, v, segments)


def unsupported_reason(impl: str, q: jax.Array, dropout_active: bool) -> str | None:
    """Why the fused kernel `impl` cannot run these inputs here, or None when it can."""
    backend = jax.default_backend()
    if impl == "cudnn":
        if backend != "gpu":
            return f"cuDNN attention needs a GPU, but JAX runs on {backend!r}"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"cuDNN attention needs bfloat16/float16 inputs, got {q.dtype}"
    if impl == "splash":
        if backend != "tpu":
            return f"splash attention needs a TPU, but JAX runs on {backend!r}"
        if q.shape[1] % SPLASH_BLOCK:
            return f"splash attention needs lengths divisible by {SPLASH_BLOCK}, got {q.shape[1]}"
    if dropout_active:
        return f"{impl} attention has no attention-probability dropout"
    return None


@functools.cache
def _warn_fallback(impl: str, reason: str) -> None:
    log.warning("attention_impl=%r falls back to 'chunked' here: %s", impl, reason)


def attention(q, k, v, key_mask, *, impl, chunk_size, dropout_rate=0.0, dropout_rng=None):
    """Dispatches on `impl` (ModelConfig.attention_impl). A fused kernel that cannot run the
    inputs here (wrong backend or dtype, dropout, length) falls back to "chunked" with a warning
    that says why; "chunked" equals "xla" up to its block size and bounds memory beyond it."""
    if impl not in ("xla", "chunked", "cudnn", "splash"):
        raise ValueError(f"unknown attention impl {impl!r}")
    dropout = dict(dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if impl in ("cudnn", "splash"):
        reason = unsupported_reason(impl, q, dropout_rng is not None and dropout_rate > 0.0)
        if reason is None:
            fused = cudnn_attention if impl == "cudnn" else splash_attention
            return fused(q, k, v, key_mask, **dropout)
        _warn_fallback(impl, reason)
        impl = "chunked"
    if impl == "xla":
        return xla_attention(q, k, v, key_mask, **dropout)
    return chunked_attention(q, k, v, key_mask, chunk_size=chunk_size, **dropout)
