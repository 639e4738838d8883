"""Retrieval scores between queries and passages, as pure jnp functions, and the mode names.

Each score is defined once for a single (query, passage) pair; `*_matrix` variants give the
[num_queries, num_passages] matrix and `*_paired` variants score row i against row i.
No temperature is applied here (callers divide, as training does).

The five modes, named as FlagEmbedding's `compute_score` names them and used under these names
by `compute_score`, evaluation, training metrics and the command line:
- dense, sparse, colbert: one head's score;
- sparse+dense: (w_d·dense + w_s·sparse) / (w_d + w_s)  (the paper's "Dense+Sparse");
- colbert+sparse+dense: (w_d·dense + w_s·sparse + w_c·colbert) / Σw  (the paper's "All").
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
# The paper's names, accepted wherever a mode is given.
MODE_ALIASES = {"dense+sparse": "sparse+dense", "all": "colbert+sparse+dense"}


def canonical_modes(modes: Sequence[str]) -> tuple[str, ...]:
    """The modes named (aliases resolved), in `MODES` order; unknown names are an error."""
    names = [MODE_ALIASES.get(m.strip(), m.strip()) for m in modes if m.strip()]
    unknown = sorted(set(names) - set(MODES))
    if unknown or not names:
        raise ValueError(
            f"modes {list(modes)}: expected a non-empty subset of {MODES} "
            f"(or the aliases {sorted(MODE_ALIASES)})"
        )
    return tuple(m for m in MODES if m in names)


def _matrix(pair_fn):
    """[Bq, ...] x [Bp, ...] → [Bq, Bp] from a single-pair function of (query..., passage...)."""
    over_passages = jax.vmap(pair_fn, in_axes=(None, None, 0, 0))
    return jax.vmap(over_passages, in_axes=(0, 0, None, None))


# Dense -----------------------------------------------------------------------------------------


def dense_matrix(q_dense: jax.Array, p_dense: jax.Array) -> jax.Array:
    """<e_q, e_p>: [Bq, D] x [Bp, D] → [Bq, Bp]."""
    return jnp.matmul(q_dense, p_dense.T, precision=jax.lax.Precision.HIGHEST)


def dense_paired(q_dense: jax.Array, p_dense: jax.Array) -> jax.Array:
    """[B, D] x [B, D] → [B]."""
    return jnp.sum(q_dense * p_dense, axis=-1)


# Sparse (lexical) ------------------------------------------------------------------------------


def sparse_lexicon(token_ids: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Turns per-token weights into a sorted bag of words with one weight per distinct id.

    token_ids, weights: [..., L] → (sorted ids [..., L], weights [..., L]) where each distinct id
    carries the max of its weights at its first sorted position and 0 elsewhere. This is the
    reference's vocab-sized max-pooled vector without the [L, vocab] (or [vocab]) tensor.
    """
    if token_ids.ndim > 1:
        return jax.vmap(sparse_lexicon)(token_ids, weights)
    order = jnp.argsort(token_ids, stable=True)
    ids = token_ids[order]
    w = weights[order]
    first = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])
    group = jnp.cumsum(first) - 1
    group_max = jax.ops.segment_max(w, group, num_segments=ids.shape[0], indices_are_sorted=True)
    return ids, jnp.where(first, group_max[group], 0.0)


def sparse_pair(q_ids: jax.Array, q_w: jax.Array, p_ids: jax.Array, p_w: jax.Array) -> jax.Array:
    """Σ_t w_q(t)·w_p(t) over shared ids t, for lexicons from `sparse_lexicon` ([Lq], [Lp])."""
    pos = jnp.clip(jnp.searchsorted(p_ids, q_ids, side="left"), 0, p_ids.shape[0] - 1)
    matched = jnp.where(p_ids[pos] == q_ids, p_w[pos], 0.0)
    return jnp.sum(q_w * matched)


sparse_lexicon_matrix = _matrix(sparse_pair)
sparse_lexicon_paired = jax.vmap(sparse_pair)


def sparse_matrix(q_ids, q_weights, p_ids, p_weights) -> jax.Array:
    """Lexical-match scores from per-token ids/weights: [Bq, Lq] x [Bp, Lp] → [Bq, Bp]."""
    return sparse_lexicon_matrix(
        *sparse_lexicon(q_ids, q_weights), *sparse_lexicon(p_ids, p_weights)
    )


def sparse_paired(q_ids, q_weights, p_ids, p_weights) -> jax.Array:
    """Lexical-match scores of row i against row i: [B, Lq] x [B, Lp] → [B]."""
    return sparse_lexicon_paired(
        *sparse_lexicon(q_ids, q_weights), *sparse_lexicon(p_ids, p_weights)
    )


# ColBERT (multi-vector) ------------------------------------------------------------------------


def colbert_pair(
    q_vecs: jax.Array, q_mask: jax.Array, p_vecs: jax.Array, p_mask: jax.Array
) -> jax.Array:
    """Late interaction: mean over real query vectors of the max similarity over real passage vectors.

    q_vecs [Lq, D], q_mask [Lq], p_vecs [Lp, D], p_mask [Lp]. Padded passage rows are excluded from
    the max (not scored as 0), so the score does not depend on padding or batch mates.
    """
    sim = jnp.matmul(q_vecs, p_vecs.T, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(p_mask[None, :], sim, jnp.finfo(sim.dtype).min)
    best = jnp.where(q_mask, sim.max(axis=-1), 0.0)
    return best.sum() / jnp.maximum(q_mask.sum(), 1)


colbert_matrix = _matrix(colbert_pair)
colbert_paired = jax.vmap(colbert_pair)


# Hybrid ----------------------------------------------------------------------------------------


def weighted_sum(
    scores: Sequence[jax.Array], weights: Sequence[float], normalize: bool = True
) -> jax.Array:
    """Σ w_i·s_i, divided by Σ w_i when `normalize` (FlagEmbedding's compute_score combinations).

    Training's ensemble teacher uses normalize=False with weights (1, 0.3, 1).
    """
    if len(scores) != len(weights):
        raise ValueError(f"{len(scores)} score arrays but {len(weights)} weights")
    total = sum(w * s for w, s in zip(weights, scores, strict=True))
    if normalize:
        total_weight = sum(weights)
        if total_weight == 0:
            raise ValueError(f"weights {list(weights)} sum to 0; cannot normalise")
        total = total / total_weight
    return total
