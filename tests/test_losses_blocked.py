"""m3_jax.losses.blocked_dense_loss, the row-blocked dense InfoNCE of the stage-2 recipe, on 8 CPU
devices (conftest sets XLA_FLAGS) and on one.

Its value and gradients equal a plain float64 numpy InfoNCE over the whole [B, B*G] matrix, on a
mesh and without one, through `m3_loss` too; compiled at the paper's stage-2 batch (67,200 rows),
its temporary memory per device is a small share of that matrix and grows linearly in the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import losses, sharding
from m3_jax.config import LossConfig
from m3_jax.model import M3Output

TAU = 0.05
B, E = 32, 8
STAGE2_BATCH = 67_200  # the paper's total batch for 0-500 tokens (700 per GPU x 96 GPUs)
MESHES = [None, (1, 8, 1), (2, 2, 2)]


def unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    x = rng.normal(size=(rows, E))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ref_infonce(q: np.ndarray, p: np.ndarray, group: int) -> tuple[float, np.ndarray, np.ndarray]:
    """mean_b −log softmax(q pᵀ / τ)[b, b·G] and its gradients in q and p, in float64."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    logits = q @ p.T / TAU
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(q))
    loss = -log_probs[rows, rows * group].mean()
    d_logits = np.exp(log_probs)
    d_logits[rows, rows * group] -= 1.0
    d_logits /= len(q) * TAU
    return float(loss), d_logits @ p, d_logits.T @ q


def value_and_grads(fn, q, p, mesh_shape):
    """jit(value_and_grad(fn)) in (q, p), on a ("data", "fsdp", "tensor") mesh or none."""
    jitted = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    if mesh_shape is None:
        return jitted(q, p)
    mesh = sharding.make_mesh(*mesh_shape)
    data = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        return jitted(jax.device_put(q, data), jax.device_put(p, data))


def assert_matches_reference(value, grads, q, p, group):
    want, want_q, want_p = ref_infonce(q, p, group)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    for got, ref in zip(grads, (want_q, want_p), strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# Value and gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", MESHES, ids=["no-mesh", "fsdp8", "2x2x2"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("row_block", [0, 3, 1024], ids=["all-rows", "3-rows", "1024-rows"])
def test_blocked_dense_loss_equals_infonce(mesh_shape, group, row_block):
    """3-row blocks: 2 blocks of 2 rows on each of 8 devices, 3 blocks of 3 with a padding row on
    each of 4 (2x2x2: data x fsdp), 11 of 3 with a padding row on one; 1024 rows: one block."""
    rng = np.random.default_rng(group)
    q, p = unit_rows(rng, B), unit_rows(rng, B * group)

    def fn(q, p):
        return losses.blocked_dense_loss(q, p, group, TAU, row_block)

    value, grads = value_and_grads(fn, q, p, mesh_shape)
    assert_matches_reference(value, grads, q, p, group)


def dense_only_outputs(dense: np.ndarray) -> M3Output:
    """M3Output with the given dense rows and minimal sparse/colbert fields (unused dense-only)."""
    rows = len(dense)
    return M3Output(
        dense=jnp.asarray(dense),
        sparse=jnp.zeros((rows, 2)),
        colbert=jnp.zeros((rows, 1, 4)),
        colbert_mask=jnp.ones((rows, 1), bool),
    )


@pytest.mark.parametrize("mesh_shape", [None, (1, 8, 1)], ids=["no-mesh", "fsdp8"])
@pytest.mark.parametrize("ddp_scale", [False, True])
def test_m3_loss_dense_only_is_the_blocked_infonce(mesh_shape, ddp_scale):
    """Dense-only stage-2 training with cross-device negatives over W = 4 shards: the loss is
    InfoNCE over the whole batch, its gradient that of the reference (1/W of it under DDP)."""
    group, shards = 2, 4
    rng = np.random.default_rng(7)
    q, p = unit_rows(rng, B), unit_rows(rng, B * group)
    q_ids = jnp.full((B, 2), 5, jnp.int32)
    p_ids = jnp.full((B * group, 2), 5, jnp.int32)
    config = LossConfig(
        temperature=TAU,
        unified=False,
        self_distill=False,
        num_shards=shards,
        ddp_dense_grad_scale=ddp_scale,
        dense_row_block=3,
    )

    def fn(q, p):
        loss, _ = losses.m3_loss(dense_only_outputs(q), dense_only_outputs(p), q_ids, p_ids, config)
        return loss

    value, grads = value_and_grads(fn, q, p, mesh_shape)
    scale = 1 / shards if ddp_scale else 1.0
    assert_matches_reference(value, [g / scale for g in grads], q, p, group)


def test_row_blocks_are_the_fewest_equal_blocks():
    assert losses.dense_row_blocks(8400, 1024) == (9, 934)
    assert losses.dense_row_blocks(1248, 1024) == (2, 624)
    assert losses.dense_row_blocks(700, 1024) == (1, 700)
    assert losses.dense_row_blocks(700, 0) == (1, 700)


def test_uneven_rows_over_the_mesh_are_an_error():
    q, p = np.zeros((12, E), np.float32), np.zeros((12, E), np.float32)
    with jax.set_mesh(sharding.make_mesh(1, 8, 1)), pytest.raises(ValueError, match="8 data"):
        losses.blocked_dense_loss(q, p, 1, TAU, 4)
    with pytest.raises(ValueError, match="dense_row_block"):
        LossConfig(dense_row_block=-1)


# Memory ----------------------------------------------------------------------------------------


def temp_bytes(batch: int, row_block: int, dim: int = 16) -> int:
    """XLA's temporary bytes per device for the loss and its gradient at `batch` rows (G = 1)
    split over 8 devices, compiled on abstract inputs (nothing is allocated)."""
    mesh = sharding.make_mesh(1, 8, 1)
    rows = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))

    def fn(q, p):
        return losses.blocked_dense_loss(q, p, 1, TAU, row_block)

    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(rows, rows).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_stage2_batch_never_holds_the_whole_matrix():
    """At 67,200 rows the whole fp32 matrix is 18 GB (2.3 GB per device as 8 row blocks); in
    blocks of at most 1024 rows (9 of 934 per device) a device holds a few 934 x 67,200 blocks."""
    whole = STAGE2_BATCH**2 * 4
    block_bytes = 1024 * STAGE2_BATCH * 4
    temp = temp_bytes(STAGE2_BATCH, 1024)
    assert temp < whole / 16
    assert temp < 4 * block_bytes


def test_temp_memory_is_linear_in_the_batch_with_fixed_block_rows():
    """Doubling the batch doubles a [rows, B] block's size, and with it the temp memory, when the
    block rows are fixed; with a fixed number of blocks it quadruples (quadratic in B)."""
    per_device = STAGE2_BATCH // 8
    fixed_rows = temp_bytes(2 * STAGE2_BATCH, 1024) / temp_bytes(STAGE2_BATCH, 1024)
    fixed_blocks = temp_bytes(2 * STAGE2_BATCH, per_device // 4) / temp_bytes(
        STAGE2_BATCH, per_device // 8
    )
    assert 1.5 < fixed_rows < 2.5
    assert fixed_blocks > 3.5
