"""Lexical weights in the formats vector databases take, besides FlagEmbedding's dict.

FlagEmbedding (and `M3Embedder.encode(..., return_sparse=True)`) gives one
`{token-id string: weight}` dict per text. Vector databases want:
- `indices` / `values` lists (Qdrant `SparseVector`, Pinecone `sparse_values`, Weaviate, Vespa
  tensors): `to_indices_values`;
- `{int token id: float weight}` (Milvus `SPARSE_FLOAT_VECTOR` rows): `to_id_weight_dict`;
- a scipy CSR matrix [num_texts, vocab_size] (Milvus bulk inserts, and the sparse retrieval in
  `m3_jax.evaluation`): `to_csr`.
Token ids are the tokenizer's (fixed by the vocab), so indices agree between queries and documents.
Indices come out sorted ascending; weights are float32 values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LexicalWeights = Mapping[str, float]


def _sorted_items(weights: LexicalWeights) -> tuple[np.ndarray, np.ndarray]:
    try:
        indices = np.fromiter((int(k) for k in weights), np.int64, len(weights))
    except ValueError as e:
        raise ValueError(
            f"lexical weight keys must be token-id strings, got {list(weights)[:5]}"
        ) from e
    values = np.fromiter((float(v) for v in weights.values()), np.float32, len(weights))
    order = np.argsort(indices, kind="stable")
    return indices[order], values[order]


def to_indices_values(weights: LexicalWeights) -> dict[str, list]:
    """{'indices': [token ids ascending], 'values': [weights]} for one text."""
    indices, values = _sorted_items(weights)
    return {"indices": indices.tolist(), "values": values.tolist()}


def to_id_weight_dict(weights: LexicalWeights) -> dict[int, float]:
    """{token id: weight} for one text (Milvus sparse rows)."""
    indices, values = _sorted_items(weights)
    return dict(zip(indices.tolist(), values.tolist(), strict=True))


def from_indices_values(indices: Sequence[int], values: Sequence[float]) -> dict[str, np.float32]:
    """Back to FlagEmbedding's dict."""
    if len(indices) != len(values):
        raise ValueError(f"{len(indices)} indices but {len(values)} values")
    return {str(int(i)): np.float32(v) for i, v in zip(indices, values, strict=True)}


def to_csr(weights: Sequence[LexicalWeights], vocab_size: int) -> Any:
    """A scipy.sparse.csr_matrix [len(weights), vocab_size] (float32), one row per text."""
    from scipy import sparse

    indptr = np.zeros(len(weights) + 1, np.int64)
    rows = [_sorted_items(w) for w in weights]
    for i, (indices, _) in enumerate(rows):
        indptr[i + 1] = indptr[i] + len(indices)
        if len(indices) and (indices[0] < 0 or indices[-1] >= vocab_size):
            raise ValueError(f"text {i}: token ids outside [0, {vocab_size}): {indices[[0, -1]]}")
    indices = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int64)
    values = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.float32)
    return sparse.csr_matrix((values, indices, indptr), shape=(len(weights), vocab_size))
