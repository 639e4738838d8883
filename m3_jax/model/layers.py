"""Parameter-holding building blocks with logical axis names on every parameter.

Logical names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `colbert`) are mapped to mesh axes by the
sharding rules; `eager_sharding=False` keeps construction independent of any mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def make_param(
    rngs: nnx.Rngs | None,
    shape: Sequence[int],
    axes: Axes,
    dtype: jnp.dtype,
    init: str,
    stddev: float = 0.0,
) -> nnx.Param:
    """A parameter initialised by `init` and tagged with its logical axes; it is placed on no mesh
    when built (the sharding rules place it later)."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {axes} differ in rank")
    if init == "normal":
        assert rngs is not None
        value = stddev * jax.random.normal(rngs.params(), tuple(shape), dtype)
    elif init == "zeros":
        value = jnp.zeros(tuple(shape), dtype)
    elif init == "ones":
        value = jnp.ones(tuple(shape), dtype)
    else:
        raise ValueError(f"unknown initializer {init!r}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Dense(nnx.Module):
    """y = x · kernel + bias, contracting the trailing `len(in_shape)` axes of x.

    Multi-axis shapes keep attention heads a separate axis ([embed, heads, kv]) so tensor
    parallelism can shard them.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        in_axes: Axes,
        out_axes: Axes,
        *,
        stddev: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = make_param(
            rngs, (*in_shape, *out_shape), in_axes + out_axes, param_dtype, "normal", stddev
        )
        self.bias = make_param(rngs, tuple(out_shape), out_axes, param_dtype, "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())))
        return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, computed in float32 and cast back to the compute dtype."""

    def __init__(self, size: int, eps: float, *, param_dtype: jnp.dtype, dtype: jnp.dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = make_param(None, (size,), ("embed",), param_dtype, "ones")
        self.bias = make_param(None, (size,), ("embed",), param_dtype, "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Embed(nnx.Module):
    """A lookup table [num, features]."""

    def __init__(
        self,
        num: int,
        features: int,
        axes: Axes,
        *,
        stddev: float,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = make_param(rngs, (num, features), axes, param_dtype, "normal", stddev)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `rng` is None (inference) or `rate` is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU in PyTorch's form, 0.5·x·(1 + erf(x/√2)). jax.nn.gelu's erfc form is the
    same function to float32 rounding; XLA's CPU backend evaluates erf faster than erfc."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))
