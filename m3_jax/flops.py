"""Analytic FLOP counts for the M3 model and model-FLOPs utilisation (MFU).

A matmul of [m, k] x [k, n] costs 2·m·k·n FLOPs. Counts cover the matmuls (embeddings, norms and
softmax are negligible); attention is counted over the padded length it actually computes.
"""

from __future__ import annotations

import time

from m3_jax.config import ModelConfig


def forward_flops_per_token(config: ModelConfig, length: int) -> float:
    """Forward FLOPs of one token in a sequence of `length`, heads included."""
    e, m = config.hidden_size, config.intermediate_size
    per_layer = 2 * (4 * e * e + 2 * e * m) + 2 * 2 * length * e  # projections+MLP, QK^T and PV
    heads = 2 * e * config.colbert_out_dim + 2 * e
    return config.num_hidden_layers * per_layer + heads


def train_flops(
    config: ModelConfig, tokens_by_length: dict[int, int], remat: bool = False
) -> float:
    """FLOPs of a training step: forward + backward (2x forward), plus a forward with remat.

    tokens_by_length: {padded sequence length: number of tokens computed at that length}.
    """
    multiplier = 4.0 if remat else 3.0
    return multiplier * sum(
        n * forward_flops_per_token(config, length) for length, n in tokens_by_length.items()
    )


def measure_matmul_peak(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """FLOP/s of a large matmul in `dtype` on the default device: the practical peak for MFU."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def mfu(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    return flops / seconds / peak_flops_per_s if seconds > 0 and peak_flops_per_s > 0 else 0.0
