"""Retrieval quality on held-out queries against a small corpus, scoring every document.

heldout jsonl: {"query_id", "query", "qrels": {doc_id: relevance}}; corpus jsonl: {"id", "text"}.
The demo's evaluation (train/main.py): `evaluate_retrieval` with every document a candidate in
every mode, so colbert and colbert+sparse+dense (w = 1, 0.3, 1) score the whole corpus.
"""

from __future__ import annotations

from pathlib import Path

from m3_jax.config import EvalConfig, ModelConfig
from m3_jax.evaluation.datasets import load_heldout
from m3_jax.evaluation.evaluate import evaluate_retrieval
from m3_jax.evaluation.modes import RetrievalSettings
from m3_jax.model import Params

HELDOUT_MODES = ("dense", "sparse", "colbert", "colbert+sparse+dense")


def evaluate_heldout(
    model_config: ModelConfig,
    params: Params,
    tokenizer_dir: str | Path,
    heldout_file: str | Path,
    corpus_file: str | Path,
    *,
    k: int = EvalConfig.k,
    batch_size: int = EvalConfig.batch_size,
) -> dict[str, float]:
    """{'dense/ndcg@10', 'sparse/ndcg@10', 'colbert/ndcg@10', 'colbert+sparse+dense/ndcg@10'}
    (with k for 10)."""
    dataset = load_heldout(heldout_file, corpus_file)
    everything = len(dataset.doc_ids)
    return evaluate_retrieval(
        model_config,
        params,
        tokenizer_dir,
        dataset,
        modes=HELDOUT_MODES,
        k=k,
        measures=("ndcg",),
        settings=RetrievalSettings(top_k=everything, rerank_depth=everything),
        batch_size=batch_size,
    )
