"""Exact retrieval over encoded texts: dense top-k on the device mesh, sparse top-k through a sparse
matrix product (an inverted index in matrix form), and exact scores of chosen candidates.

Scores are those of `m3_jax.scores` / `M3Embedder.compute_score`: dense dot product, the lexical
match Σ_t w_q(t)·w_p(t), and colbert maxsim averaged over query vectors (no floor at 0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3_jax import scores
from m3_jax.evaluation.encoding import EncodedTexts

CORPUS_AXIS = "corpus"


def default_mesh() -> Mesh:
    """All devices on one axis: the corpus rows are split over every device."""
    return Mesh(np.array(jax.devices()), (CORPUS_AXIS,))


@functools.partial(jax.jit, static_argnames="k")
def _dense_top_k(queries, corpus, valid, k: int):
    """queries [Q, D] (replicated), corpus [N, D] and valid [N] (row-sharded) → [Q, k] twice."""
    sim = scores.dense_matrix(queries.astype(jnp.float32), corpus.astype(jnp.float32))
    sim = jnp.where(valid[None, :], sim, -jnp.inf)  # rows added to fill the last shard
    return jax.lax.top_k(sim, k)


def dense_search(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    *,
    mesh: Mesh | None = None,
    query_batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product: (scores [Q, k'], corpus indices [Q, k']) with k' = min(k, N).

    The corpus matrix is split by rows over all devices of `mesh` (every mesh axis; default: all
    devices), one jitted matmul + `lax.top_k` per query batch; queries are replicated. Query
    batches are padded to `query_batch` rows so one program serves them all.
    """
    if queries.ndim != 2 or corpus.ndim != 2 or queries.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"dense_search needs [Q, D] and [N, D], got {queries.shape}, {corpus.shape}"
        )
    mesh = mesh or default_mesh()
    n, dim = corpus.shape
    k = min(k, n)
    rows = math.ceil(n / mesh.size) * mesh.size
    padded = np.zeros((rows, dim), corpus.dtype)
    padded[:n] = corpus
    row_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    replicated = NamedSharding(mesh, PartitionSpec())
    corpus_dev = jax.device_put(padded, row_sharding)
    valid = jax.device_put(np.arange(rows) < n, row_sharding)
    batch = min(query_batch, len(queries))
    out_scores = np.zeros((len(queries), k), np.float32)
    out_indices = np.zeros((len(queries), k), np.int64)
    for start in range(0, len(queries), batch):
        q = np.zeros((batch, dim), np.float32)
        chunk = queries[start : start + batch]
        q[: len(chunk)] = chunk
        s, i = _dense_top_k(jax.device_put(q, replicated), corpus_dev, valid, k)
        out_scores[start : start + len(chunk)] = np.asarray(s)[: len(chunk)]
        out_indices[start : start + len(chunk)] = np.asarray(i)[: len(chunk)]
    return out_scores, out_indices


def _top_k_rows(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top k of a dense [Q, N] array, best first (ties: lower index first, also for
    which of the documents tied at the k-th score are kept: `lax.top_k`'s rule, as dense)."""
    k = min(k, matrix.shape[1])
    kth = -np.partition(-matrix, k - 1, axis=1)[:, k - 1 : k]
    # argpartition alone would keep an arbitrary subset of the documents tied at the k-th score
    # (lexical scores tie at 0 often): keep all above it, then the lowest indices of the tied.
    above = matrix > kth
    tied = matrix == kth
    keep = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    part = np.nonzero(keep)[1].reshape(len(matrix), k)
    part_scores = np.take_along_axis(matrix, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    indices = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(matrix, indices, axis=1), indices


def sparse_search(
    queries, corpus, k: int, *, max_scores_per_block: int = 1 << 25
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by lexical match for CSR lexical weights ([Q, V] and [N, V]).

    `queries @ corpus.T` visits, for each query token, only the documents holding that token (the
    inverted index); the [block, N] result is densified a block of queries at a time.
    """
    corpus_t = corpus.T.tocsr()  # [V, N]: the posting lists
    n = corpus.shape[0]
    block = max(1, max_scores_per_block // max(n, 1))
    all_scores, all_indices = [], []
    for start in range(0, queries.shape[0], block):
        sims = (queries[start : start + block] @ corpus_t).toarray().astype(np.float32)
        s, i = _top_k_rows(sims, k)
        all_scores.append(s)
        all_indices.append(i)
    return np.concatenate(all_scores), np.concatenate(all_indices).astype(np.int64)


def dense_scores(
    queries: EncodedTexts, q: int, corpus: EncodedTexts, docs: np.ndarray
) -> np.ndarray:
    return (corpus.dense[docs] @ queries.dense[q]).astype(np.float32)


def sparse_scores(
    queries: EncodedTexts, q: int, corpus: EncodedTexts, docs: np.ndarray
) -> np.ndarray:
    return (corpus.sparse[docs] @ queries.sparse[q].T).toarray().ravel().astype(np.float32)


def colbert_scores(
    queries: EncodedTexts, q: int, corpus: EncodedTexts, docs: np.ndarray
) -> np.ndarray:
    """Mean over query vectors of the max similarity over each candidate's vectors."""
    q_vecs = queries.colbert(q)
    if len(q_vecs) == 0 or len(docs) == 0:
        return np.zeros(len(docs), np.float32)
    starts, ends = corpus.colbert_offsets[docs], corpus.colbert_offsets[docs + 1]
    rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)])
    sim = corpus.colbert_vecs[rows] @ q_vecs.T  # [candidate vectors, query vectors]
    seg_starts = np.concatenate([[0], np.cumsum(ends - starts)[:-1]])
    best = np.maximum.reduceat(sim, seg_starts, axis=0)  # [candidates, query vectors]
    return best.mean(axis=1).astype(np.float32)
