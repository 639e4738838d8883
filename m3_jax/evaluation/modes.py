"""The paper's five retrieval modes over encoded queries and corpus (the M3 paper's protocol:
a first stage of depth 1000, and the multi-vector modes reranking dense candidates).

- dense:                exact dense top-`top_k` (the paper: Faiss top-1000).
- sparse:               exact lexical top-`top_k` (the paper: Lucene top-1000).
- colbert:              the dense top-`rerank_depth` (200) reranked by colbert score.
- sparse+dense:         the union of the dense and sparse top-`top_k` reranked by
                        (w_d·dense + w_s·sparse)/(w_d + w_s), w = (1, 0.3) by default
                        (the paper's MLDR setting: (0.2, 0.8)).
- colbert+sparse+dense: ("All") the dense top-`rerank_depth` reranked by
                        (w_d·dense + w_s·sparse + w_c·colbert)/Σw, w = (1, 0.3, 1) by default
                        (MLDR: (0.15, 0.5, 0.35)).
The weighted sums are FlagEmbedding's `compute_score` combinations (the division does not change
the ranking). Each mode gives a run {query id: {doc id: score}}.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from m3_jax.evaluation.encoding import EncodedTexts
from m3_jax.evaluation.retrieval import (
    colbert_scores,
    dense_scores,
    dense_search,
    sparse_scores,
    sparse_search,
)
from m3_jax.scores import MODES, canonical_modes, weighted_sum

NEEDS = {
    "dense": ("dense",),
    "sparse": ("sparse",),
    "colbert": ("dense", "colbert"),
    "sparse+dense": ("dense", "sparse"),
    "colbert+sparse+dense": ("dense", "sparse", "colbert"),
}
Run = dict[str, dict[str, float]]
SINGLE_SCORES = {"dense": dense_scores, "sparse": sparse_scores, "colbert": colbert_scores}


@dataclasses.dataclass(frozen=True)
class RetrievalSettings:
    top_k: int = 1000  # first-stage depth of dense, sparse and sparse+dense
    rerank_depth: int = 200  # dense candidates reranked by colbert and colbert+sparse+dense
    dense_sparse_weights: tuple[float, float] = (1.0, 0.3)  # (dense, sparse)
    all_weights: tuple[float, float, float] = (1.0, 0.3, 1.0)  # (dense, sparse, colbert)

    def __post_init__(self):
        if self.top_k < 1 or self.rerank_depth < 1:
            raise ValueError(
                f"top_k={self.top_k} and rerank_depth={self.rerank_depth} must be >= 1"
            )
        if len(self.dense_sparse_weights) != 2 or len(self.all_weights) != 3:
            raise ValueError(
                "dense_sparse_weights needs (dense, sparse), all_weights (dense, sparse, colbert)"
            )


def required_outputs(modes: Sequence[str]) -> tuple[str, ...]:
    needed = {o for m in canonical_modes(modes) for o in NEEDS[m]}
    return tuple(o for o in ("dense", "sparse", "colbert") if o in needed)


def _as_run(query_ids, doc_ids, indices: np.ndarray, values: np.ndarray) -> Run:
    return {
        qid: {doc_ids[d]: float(s) for d, s in zip(idx, val, strict=True)}
        for qid, idx, val in zip(query_ids, indices, values, strict=True)
    }


def run_modes(
    queries: EncodedTexts,
    corpus: EncodedTexts,
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    modes: Sequence[str] = MODES,
    settings: RetrievalSettings = RetrievalSettings(),  # noqa: B008 (frozen dataclass)
    *,
    mesh: Mesh | None = None,
) -> dict[str, Run]:
    """{mode: run} for each requested mode."""
    modes = canonical_modes(modes)
    runs: dict[str, Run] = {}
    dense_depth = max(
        settings.top_k if {"dense", "sparse+dense"} & set(modes) else 0,
        settings.rerank_depth if {"colbert", "colbert+sparse+dense"} & set(modes) else 0,
    )
    dense_top = sparse_top = None
    if dense_depth:
        dense_top = dense_search(queries.dense, corpus.dense, dense_depth, mesh=mesh)
    if {"sparse", "sparse+dense"} & set(modes):
        sparse_top = sparse_search(queries.sparse, corpus.sparse, settings.top_k)
    if "dense" in modes:
        s, i = dense_top
        runs["dense"] = _as_run(query_ids, doc_ids, i[:, : settings.top_k], s[:, : settings.top_k])
    if "sparse" in modes:
        runs["sparse"] = _as_run(query_ids, doc_ids, sparse_top[1], sparse_top[0])

    rerank = [m for m in ("colbert", "sparse+dense", "colbert+sparse+dense") if m in modes]
    for mode in rerank:
        runs[mode] = {}
    for q, qid in enumerate(query_ids):
        shallow = dense_top[1][q, : settings.rerank_depth] if dense_top is not None else None
        for mode in rerank:
            docs = shallow
            if mode == "sparse+dense":
                docs = fused_candidates(dense_top[1][q, : settings.top_k], sparse_top[1][q])
            values = candidate_scores(mode, queries, q, corpus, docs, settings)
            runs[mode][qid] = _scored(doc_ids, docs, values)
    return runs


RERANK_SUFFIX = "+rerank"


def rerank_run(
    run: Run,
    reranker: Any,
    query_texts: Mapping[str, str],
    doc_texts: Mapping[str, str],
    depth: int,
) -> Run:
    """Each query's top-`depth` documents of `run`, scored again by a cross-encoder
    (`m3_jax.Reranker`; its raw logits): one `compute_score` call for all the pairs, so they
    share the length buckets."""
    if depth < 1:
        raise ValueError(f"rerank depth must be >= 1, got {depth}")
    keys = [
        (qid, doc)
        for qid, docs in run.items()
        for doc, _ in sorted(docs.items(), key=lambda item: -item[1])[:depth]
    ]
    if not keys:
        return {qid: {} for qid in run}
    scores = reranker.compute_score([(query_texts[q], doc_texts[d]) for q, d in keys])
    reranked: Run = {qid: {} for qid in run}
    for (qid, doc), score in zip(keys, scores, strict=True):
        reranked[qid][doc] = float(score)
    return reranked


def fused_candidates(dense_docs: np.ndarray, sparse_docs: np.ndarray) -> np.ndarray:
    """sparse+dense's candidates: the union of the dense and the sparse first stage (sorted)."""
    return np.union1d(dense_docs, sparse_docs)


def candidate_scores(
    mode: str,
    queries: EncodedTexts,
    q: int,
    corpus: EncodedTexts,
    docs: np.ndarray,
    settings: RetrievalSettings = RetrievalSettings(),  # noqa: B008 (frozen dataclass)
) -> np.ndarray:
    """Exact `mode` scores of the corpus rows `docs` for query row `q` (float32 [len(docs)])."""
    if mode in SINGLE_SCORES:
        return SINGLE_SCORES[mode](queries, q, corpus, docs)
    heads, weights = (
        (("dense", "sparse"), settings.dense_sparse_weights)
        if mode == "sparse+dense"
        else (("dense", "sparse", "colbert"), settings.all_weights)
    )
    parts = [SINGLE_SCORES[h](queries, q, corpus, docs) for h in heads]
    return np.asarray(weighted_sum(parts, weights), np.float32)


def _scored(doc_ids: Sequence[str], docs: np.ndarray, values: np.ndarray) -> dict[str, float]:
    return {doc_ids[d]: float(s) for d, s in zip(docs, values, strict=True)}
