"""m3_jax.scores against independent numpy implementations of the reference's score formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3_jax import scores

TOL = dict(rtol=1e-5, atol=1e-6)
# Jitted once here: op-by-op dispatch of the vmapped score functions is slow.
sparse_matrix = jax.jit(scores.sparse_matrix)
sparse_paired = jax.jit(scores.sparse_paired)
colbert_matrix = jax.jit(scores.colbert_matrix)
colbert_paired = jax.jit(scores.colbert_paired)
VOCAB = 40
PAD = 1


# Independent references ------------------------------------------------------------------------


def ref_sparse_vector(ids: np.ndarray, weights: np.ndarray, vocab: int = VOCAB) -> np.ndarray:
    """The reference's max-pooled vocab-sized vector (scatter_reduce 'amax' with a 0 floor)."""
    vec = np.zeros(vocab, np.float64)
    np.maximum.at(vec, ids, weights.astype(np.float64))
    return vec


def ref_sparse_score(q_ids, q_w, p_ids, p_w) -> float:
    return float(ref_sparse_vector(q_ids, q_w) @ ref_sparse_vector(p_ids, p_w))


def ref_colbert_score(q: np.ndarray, p: np.ndarray) -> float:
    """FlagEmbedding's unpadded `colbert_score`: mean over query rows of the max over passage rows."""
    sim = q.astype(np.float64) @ p.astype(np.float64).T
    return float(sim.max(axis=1).sum() / len(q))


# Random inputs ---------------------------------------------------------------------------------


def random_sparse_batch(rng: np.random.Generator, batch: int, length: int):
    """Ids from a small range (many repeats), some zero weights, right padding (id 1, weight 0)."""
    ids = rng.integers(0, 12, size=(batch, length)).astype(np.int32)
    ids[ids == PAD] = 5  # id 1 only as padding
    weights = rng.uniform(0.0, 2.0, size=(batch, length)).astype(np.float32)
    weights[rng.random((batch, length)) < 0.25] = 0.0
    for row in range(batch):
        n = rng.integers(1, length + 1)
        ids[row, n:] = PAD
        weights[row, n:] = 0.0
    return ids, weights


def random_colbert_batch(rng: np.random.Generator, batch: int, length: int, dim: int, garbage=True):
    """Random vectors with random right padding; padded rows hold garbage (or zeros)."""
    vecs = rng.normal(size=(batch, length, dim)).astype(np.float32)
    mask = np.zeros((batch, length), bool)
    for row in range(batch):
        mask[row, : rng.integers(1, length + 1)] = True
    if garbage:
        vecs[~mask] = rng.normal(0.0, 5.0, size=vecs[~mask].shape)
    else:
        vecs[~mask] = 0.0
    return vecs, mask


# Dense -----------------------------------------------------------------------------------------


def test_dense_matrix_and_paired():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    p = rng.normal(size=(5, 16)).astype(np.float32)
    expected = q.astype(np.float64) @ p.astype(np.float64).T
    np.testing.assert_allclose(np.asarray(scores.dense_matrix(q, p)), expected, **TOL)
    paired = np.asarray(scores.dense_paired(q, p[:3]))
    assert paired.shape == (3,)
    np.testing.assert_allclose(paired, np.diag(expected[:, :3]), **TOL)


# Sparse ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_matrix_matches_vocab_vectors(seed):
    rng = np.random.default_rng(seed)
    q_ids, q_w = random_sparse_batch(rng, 4, 9)
    p_ids, p_w = random_sparse_batch(rng, 6, 13)
    got = np.asarray(sparse_matrix(q_ids, q_w, p_ids, p_w))
    expected = np.array(
        [[ref_sparse_score(q_ids[i], q_w[i], p_ids[j], p_w[j]) for j in range(6)] for i in range(4)]
    )
    assert got.shape == (4, 6)
    assert np.count_nonzero(expected) > 0
    np.testing.assert_allclose(got, expected, **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_sparse_paired_matches_vocab_vectors(seed):
    rng = np.random.default_rng(seed)
    q_ids, q_w = random_sparse_batch(rng, 5, 7)
    p_ids, p_w = random_sparse_batch(rng, 5, 11)
    got = np.asarray(sparse_paired(q_ids, q_w, p_ids, p_w))
    expected = np.array([ref_sparse_score(q_ids[i], q_w[i], p_ids[i], p_w[i]) for i in range(5)])
    np.testing.assert_allclose(got, expected, **TOL)


def test_sparse_repeated_ids_count_once_with_max_weight():
    # id 7 appears three times in the query and twice in the passage: only the maxima multiply.
    q_ids = np.array([[0, 7, 7, 9, 7, 2, 1, 1]], np.int32)
    q_w = np.array([[0.0, 0.5, 2.0, 1.0, 0.25, 0.0, 0.0, 0.0]], np.float32)
    p_ids = np.array([[0, 7, 4, 7, 2]], np.int32)
    p_w = np.array([[0.0, 3.0, 1.0, 0.5, 0.0]], np.float32)
    got = float(sparse_matrix(q_ids, q_w, p_ids, p_w)[0, 0])
    assert got == pytest.approx(2.0 * 3.0, rel=1e-6)
    assert float(sparse_paired(q_ids, q_w, p_ids, p_w)[0]) == pytest.approx(6.0, rel=1e-6)


def test_sparse_lexicon_properties():
    rng = np.random.default_rng(3)
    ids, weights = random_sparse_batch(rng, 4, 15)
    lex_ids, lex_w = (np.asarray(x) for x in scores.sparse_lexicon(ids, weights))
    assert lex_ids.shape == ids.shape and lex_w.shape == weights.shape
    for row in range(ids.shape[0]):
        # Same multiset of ids, sorted.
        np.testing.assert_array_equal(lex_ids[row], np.sort(ids[row]))
        for token in np.unique(ids[row]):
            group = lex_w[row][lex_ids[row] == token]
            # Exactly the first sorted occurrence carries the max; the rest are 0.
            assert group[0] == pytest.approx(weights[row][ids[row] == token].max())
            assert np.all(group[1:] == 0.0)
        # The lexicon is the vocab vector in disguise.
        vec = np.zeros(VOCAB)
        np.add.at(vec, lex_ids[row], lex_w[row])
        np.testing.assert_allclose(vec, ref_sparse_vector(ids[row], weights[row]), **TOL)
    # Batched equals row by row.
    single_ids, single_w = scores.sparse_lexicon(jnp.asarray(ids[2]), jnp.asarray(weights[2]))
    np.testing.assert_array_equal(np.asarray(single_ids), lex_ids[2])
    np.testing.assert_array_equal(np.asarray(single_w), lex_w[2])


def test_sparse_gradient_is_finite_and_goes_to_max_occurrence():
    q_ids = np.array([[5, 5, 6, 1]], np.int32)
    q_w = np.array([[0.5, 1.5, 1.0, 0.0]], np.float32)
    p_ids = np.array([[5, 6, 6, 1, 1]], np.int32)
    p_w = np.array([[2.0, 0.25, 0.75, 0.0, 0.0]], np.float32)

    def loss(qw, pw):
        return scores.sparse_matrix(q_ids, qw, p_ids, pw).sum()

    gq, gp = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(q_w), jnp.asarray(p_w))
    gq, gp = np.asarray(gq), np.asarray(gp)
    assert np.all(np.isfinite(gq)) and np.all(np.isfinite(gp))
    # score = 1.5*2.0 + 1.0*0.75: d/dq = [0, 2.0, 0.75, 0], d/dp = [1.5, 0, 1.0, 0, 0]
    np.testing.assert_allclose(gq[0], [0.0, 2.0, 0.75, 0.0], **TOL)
    np.testing.assert_allclose(gp[0], [1.5, 0.0, 1.0, 0.0, 0.0], **TOL)

    rng = np.random.default_rng(4)
    qi, qw = random_sparse_batch(rng, 3, 8)
    pi, pw = random_sparse_batch(rng, 4, 10)
    grads = jax.jit(
        jax.grad(
            lambda a, b: (
                scores.sparse_matrix(qi, a, pi, b).sum()
                + scores.sparse_paired(qi, a, pi[:3], b[:3]).sum()
            ),
            argnums=(0, 1),
        )
    )(jnp.asarray(qw), jnp.asarray(pw))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ColBERT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_colbert_matrix_and_paired_match_unpadded_formula(seed):
    rng = np.random.default_rng(seed)
    q, q_mask = random_colbert_batch(rng, 3, 6, 8)
    p, p_mask = random_colbert_batch(rng, 4, 9, 8)
    expected = np.array(
        [[ref_colbert_score(q[i][q_mask[i]], p[j][p_mask[j]]) for j in range(4)] for i in range(3)]
    )
    got = np.asarray(colbert_matrix(q, q_mask, p, p_mask))
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, **TOL)
    paired = np.asarray(colbert_paired(q, q_mask, p[:3], p_mask[:3]))
    np.testing.assert_allclose(paired, np.diag(expected[:, :3]), **TOL)


def test_colbert_padding_never_floors_negative_similarities():
    """Zero padded passage rows must not win the max: a colbert score is batch-independent."""
    rng = np.random.default_rng(5)
    dim = 8
    q_real = np.abs(rng.normal(size=(3, dim))).astype(np.float32)
    p_real = [-np.abs(rng.normal(size=(n, dim))).astype(np.float32) for n in (2, 5, 7)]
    length = 10
    p = np.zeros((3, length, dim), np.float32)  # zero padding, as the model produces
    p_mask = np.zeros((3, length), bool)
    for j, rows in enumerate(p_real):
        p[j, : len(rows)] = rows
        p_mask[j, : len(rows)] = True
    q = np.zeros((1, 5, dim), np.float32)
    q[0, :3] = q_real
    q_mask = np.array([[True, True, True, False, False]])

    expected = np.array([[ref_colbert_score(q_real, rows) for rows in p_real]])
    got = np.asarray(colbert_matrix(q, q_mask, p, p_mask))
    assert np.all(got < 0), "zero padding floored a max similarity at 0"
    np.testing.assert_allclose(got, expected, **TOL)
    # The same passage alone, unpadded, gives the same score: no dependence on batch mates.
    for j, rows in enumerate(p_real):
        alone = colbert_matrix(q, q_mask, rows[None], np.ones((1, len(rows)), bool))
        np.testing.assert_allclose(np.asarray(alone)[0, 0], got[0, j], **TOL)
    paired = colbert_paired(np.repeat(q, 3, axis=0), np.repeat(q_mask, 3, axis=0), p, p_mask)
    np.testing.assert_allclose(np.asarray(paired), expected[0], **TOL)


def test_colbert_gradient_is_finite_and_zero_at_padding():
    rng = np.random.default_rng(6)
    q, q_mask = random_colbert_batch(rng, 2, 5, 4, garbage=False)
    p, p_mask = random_colbert_batch(rng, 3, 7, 4, garbage=False)

    def loss(qv, pv):
        return (
            scores.colbert_matrix(qv, q_mask, pv, p_mask).sum()
            + scores.colbert_paired(qv, q_mask, pv[:2], p_mask[:2]).sum()
        )

    gq, gp = (np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1)))(q, p))
    assert np.all(np.isfinite(gq)) and np.all(np.isfinite(gp))
    assert np.all(gq[~q_mask] == 0.0)
    assert np.all(gp[~p_mask] == 0.0)
    assert np.any(gq != 0.0) and np.any(gp != 0.0)


# Hybrid ----------------------------------------------------------------------------------------


def test_weighted_sum():
    a = np.array([1.0, 2.0], np.float32)
    b = np.array([0.5, -1.0], np.float32)
    c = np.array([3.0, 0.0], np.float32)
    got = np.asarray(scores.weighted_sum([a, b, c], [1.0, 0.3, 1.0]))
    np.testing.assert_allclose(got, (a + 0.3 * b + c) / 2.3, **TOL)
    got = np.asarray(scores.weighted_sum([a, b, c], [1.0, 0.3, 1.0], normalize=False))
    np.testing.assert_allclose(got, a + 0.3 * b + c, **TOL)
    got = np.asarray(scores.weighted_sum([a, b], [0.4, 0.2]))
    np.testing.assert_allclose(got, (0.4 * a + 0.2 * b) / 0.6, **TOL)


def test_weighted_sum_errors():
    a = np.ones(2, np.float32)
    with pytest.raises(ValueError, match="2 score arrays but 3 weights"):
        scores.weighted_sum([a, a], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="sum to 0"):
        scores.weighted_sum([a, a], [1.0, -1.0])
    # Unnormalised sums accept weights that cancel.
    np.testing.assert_allclose(np.asarray(scores.weighted_sum([a, a], [1.0, -1.0], False)), 0.0)
