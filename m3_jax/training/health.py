"""Head health: each training batch's signs that a retrieval head is collapsing.

The sparse head is a ReLU per token, and it can die: once every weight is 0, every candidate
scores 0, the sparse loss sits at ln(candidates) and no gradient reaches the head again.
`sparse_active` (the share of content tokens with a positive weight) falls towards 0 first, and
`sparse_weight` (the mean of the positive weights) shows how strongly the live ones match.
It dies when the sparse scores start large and wrong for the loss temperature: the first sparse
loss is then far above ln(candidates) and the fastest way down is every weight to 0, where the
bilinear score has no gradient either (the README's training section has the measurements).
The dense and colbert heads collapse differently, by mapping every text (or token) to nearly one
direction: `dense_cosine` and `colbert_cosine`, the mean cosine between two different vectors of
the batch, climb towards 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from m3_jax.model import M3Output

SPARSE_ACTIVE = "health/sparse_active"
SPARSE_WEIGHT = "health/sparse_weight"
DENSE_COSINE = "health/dense_cosine"
COLBERT_COSINE = "health/colbert_cosine"


def mean_pairwise_cosine(vectors: jax.Array, keep: jax.Array) -> jax.Array:
    """Mean of v_i·v_j over pairs i != j of the kept unit vectors ([n, d], [n] bool), from the
    sum of the vectors: |Σv|² = Σ|v_i|² + Σ_{i≠j} v_i·v_j, so no [n, n] matrix is built."""
    v = jnp.where(keep[:, None], vectors.astype(jnp.float32), 0.0)
    total = v.sum(axis=0)
    count = keep.sum().astype(jnp.float32)
    pairs = jnp.maximum(count * (count - 1.0), 1.0)
    return (total @ total - (v * v).sum()) / pairs


def content_mask(ids: jax.Array, mask: jax.Array, special_token_ids: tuple[int, ...]) -> jax.Array:
    """Real tokens that are not special ids: where the sparse head may give a weight."""
    keep = mask.astype(bool)
    for token_id in special_token_ids:
        keep = keep & (ids != token_id)
    return keep


def head_health(
    q: M3Output,
    p: M3Output,
    q_ids: jax.Array,
    p_ids: jax.Array,
    q_mask: jax.Array,
    p_mask: jax.Array,
    special_token_ids: tuple[int, ...],
) -> dict[str, jax.Array]:
    """The four health measures over the batch's queries and passages together."""
    q, p = jax.lax.stop_gradient((q, p))
    weights = jnp.concatenate([q.sparse.ravel(), p.sparse.ravel()])
    content = jnp.concatenate(
        [
            content_mask(q_ids, q_mask, special_token_ids).ravel(),
            content_mask(p_ids, p_mask, special_token_ids).ravel(),
        ]
    )
    active = content & (weights > 0)
    num_active = active.sum().astype(jnp.float32)
    dense = jnp.concatenate([q.dense, p.dense])
    colbert = jnp.concatenate(
        [q.colbert.reshape(-1, q.colbert.shape[-1]), p.colbert.reshape(-1, p.colbert.shape[-1])]
    )
    colbert_keep = jnp.concatenate([q.colbert_mask.ravel(), p.colbert_mask.ravel()])
    return {
        SPARSE_ACTIVE: num_active / jnp.maximum(content.sum().astype(jnp.float32), 1.0),
        SPARSE_WEIGHT: jnp.where(active, weights, 0.0).sum() / jnp.maximum(num_active, 1.0),
        DENSE_COSINE: mean_pairwise_cosine(dense, jnp.ones(dense.shape[0], bool)),
        COLBERT_COSINE: mean_pairwise_cosine(colbert, colbert_keep),
    }


def sparse_collapse_warning(record: dict[str, float], threshold: float) -> str | None:
    """The warning for a logged window whose sparse head is (nearly) dead, or None."""
    share = record.get(SPARSE_ACTIVE)
    if share is None or share >= threshold:
        return None
    return (
        f"the sparse head is collapsing: {share:.2%} of content tokens have a positive weight "
        f"(below train.sparse_health_threshold={threshold}); once none has, the sparse loss "
        "stays at ln(candidates) and the head gets no gradient. The likely cause is sparse "
        "scores that start large and wrong for loss.temperature (a first loss/sparse above "
        "ln(candidates), worse than scoring every candidate alike): a random head at the "
        "encoder's scale, or a temperature below the one the head was trained with. "
        "Start from a trained sparse head or a small fresh one (model.fresh_heads), keep "
        "loss.temperature at the head's, or lower optim.lr; a later "
        "loss.self_distill_start_step or a larger sparse loss weight does not prevent it"
    )
