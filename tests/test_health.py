"""Head health against numpy: the sparse head's live share and weight, the mean pairwise cosine
of dense and colbert vectors, and the collapse warning."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax.model import M3Output
from m3_jax.training.health import (
    COLBERT_COSINE,
    DENSE_COSINE,
    SPARSE_ACTIVE,
    SPARSE_WEIGHT,
    head_health,
    mean_pairwise_cosine,
    sparse_collapse_warning,
)

SPECIALS = (0, 1, 2)  # cls, pad, eos of the synthetic ids


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def pairwise_reference(vectors: np.ndarray) -> float:
    pairs = [a @ b for a, b in itertools.permutations(vectors, 2)]
    return float(np.mean(pairs))


def test_mean_pairwise_cosine_is_the_mean_over_distinct_pairs():
    rng = np.random.default_rng(0)
    v = unit(rng.normal(size=(9, 5)).astype(np.float32))
    keep = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    got = float(mean_pairwise_cosine(jnp.asarray(v), jnp.asarray(keep)))
    assert got == pytest.approx(pairwise_reference(v[keep]), abs=1e-6)
    same = np.repeat(v[:1], 4, axis=0)  # a collapse: every vector the same
    assert float(mean_pairwise_cosine(jnp.asarray(same), jnp.ones(4, bool))) == pytest.approx(1.0)


def outputs(rng, batch: int, length: int, ids: np.ndarray, mask: np.ndarray, dead: bool):
    sparse = np.maximum(rng.normal(size=(batch, length)), 0.0).astype(np.float32)
    sparse *= mask * ~np.isin(ids, SPECIALS)
    if dead:
        sparse[:] = 0.0
    colbert_mask = mask[:, 1:].astype(bool)
    colbert = (
        unit(rng.normal(size=(batch, length - 1, 6))).astype(np.float32) * colbert_mask[..., None]
    )
    dense = unit(rng.normal(size=(batch, 6))).astype(np.float32)
    return M3Output(*map(jnp.asarray, (dense, sparse, colbert, colbert_mask))), sparse


def token_batch(rng, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(3, length + 1, size=batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.integers(3, 50, size=(batch, length)), 1)
    ids[:, 0] = 0
    ids[np.arange(batch), lengths - 1] = 2
    return ids, mask


@pytest.mark.parametrize("dead", [False, True])
def test_head_health_matches_numpy(dead):
    rng = np.random.default_rng(1)
    q_ids, q_mask = token_batch(rng, 3, 7)
    p_ids, p_mask = token_batch(rng, 6, 11)
    q, q_sparse = outputs(rng, 3, 7, q_ids, q_mask, dead)
    p, p_sparse = outputs(rng, 6, 11, p_ids, p_mask, dead)
    got = head_health(q, p, *map(jnp.asarray, (q_ids, p_ids, q_mask, p_mask)), SPECIALS)

    content = np.concatenate(
        [(q_mask.astype(bool) & ~np.isin(q_ids, SPECIALS)).ravel(),
         (p_mask.astype(bool) & ~np.isin(p_ids, SPECIALS)).ravel()]
    )  # fmt: skip
    weights = np.concatenate([q_sparse.ravel(), p_sparse.ravel()])[content]
    live = weights[weights > 0]
    assert float(got[SPARSE_ACTIVE]) == pytest.approx(live.size / content.sum())
    assert float(got[SPARSE_WEIGHT]) == pytest.approx(live.mean() if live.size else 0.0, rel=1e-6)
    dense = np.concatenate([np.asarray(q.dense), np.asarray(p.dense)])
    assert float(got[DENSE_COSINE]) == pytest.approx(pairwise_reference(dense), abs=1e-6)
    tokens = np.concatenate([np.asarray(x.colbert)[np.asarray(x.colbert_mask)] for x in (q, p)])
    assert float(got[COLBERT_COSINE]) == pytest.approx(pairwise_reference(tokens), abs=1e-6)
    assert (float(got[SPARSE_ACTIVE]) == 0.0) == dead


def test_collapse_warning_names_the_threshold_and_the_settings():
    assert sparse_collapse_warning({SPARSE_ACTIVE: 0.4}, 0.05) is None
    assert sparse_collapse_warning({"loss/loss": 1.0}, 0.05) is None  # no health measured
    warning = sparse_collapse_warning({SPARSE_ACTIVE: 0.0}, 0.05)
    assert "0.00% of content tokens" in warning and "train.sparse_health_threshold=0.05" in warning
    for setting in ("optim.lr", "loss.self_distill_start_step", "loss.loss_weights"):
        assert setting in warning
