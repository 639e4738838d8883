"""Retrieval quality on held-out queries against a small in-memory corpus (exact scoring).

heldout jsonl: {"query_id", "query", "qrels": {doc_id: relevance}}; corpus jsonl: {"id", "text"}.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from m3_jax.config import ModelConfig
from m3_jax.evaluation.metrics import ndcg_at_k
from m3_jax.inference import M3Embedder
from m3_jax.model_dir import Params, model_from_params
from m3_jax.scores import weighted_sum
from m3_jax.tokenization import load_tokenizer

HYBRID_WEIGHTS = (1.0, 0.3, 1.0)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
    return rows


def evaluate_heldout(
    model_config: ModelConfig,
    params: Params,
    tokenizer_dir: str | Path,
    heldout_file: str | Path,
    corpus_file: str | Path,
    *,
    k: int = 10,
    batch_size: int = 64,
) -> dict[str, float]:
    """nDCG@k of dense, sparse, colbert and all-three retrieval, scoring every corpus document."""
    queries = read_jsonl(heldout_file)
    corpus = read_jsonl(corpus_file)
    embedder = M3Embedder(
        model_from_params(model_config.replace(dtype="float32"), params),
        load_tokenizer(tokenizer_dir),
        batch_size=batch_size,
        show_progress=False,
    )
    everything = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True)
    q = embedder.encode_queries([x["query"] for x in queries], **everything)
    c = embedder.encode_corpus([x["text"] for x in corpus], **everything)
    doc_ids = [x["id"] for x in corpus]
    qrels = {x["query_id"]: {d: int(r) for d, r in x["qrels"].items()} for x in queries}
    dense = q["dense_vecs"] @ c["dense_vecs"].T
    sparse = np.array(
        [
            [embedder.compute_lexical_matching_score(a, b) for b in c["lexical_weights"]]
            for a in q["lexical_weights"]
        ]
    )
    colbert = np.array(
        [
            [float((a @ b.T).max(axis=1).mean()) for b in c["colbert_vecs"]]
            for a in q["colbert_vecs"]
        ]
    )
    # The paper's "All" mode: w = (1, 0.3, 1) over dense, sparse and colbert.
    hybrid = weighted_sum([dense, sparse, colbert], HYBRID_WEIGHTS)
    out = {}
    modes = (("dense", dense), ("sparse", sparse), ("colbert", colbert), ("all", hybrid))
    for mode, matrix in modes:
        run = {
            x["query_id"]: dict(zip(doc_ids, map(float, row), strict=True))
            for x, row in zip(queries, matrix, strict=True)
        }
        out[f"{mode}_ndcg@{k}"] = ndcg_at_k(run, qrels, k)
    return out
