"""Retrieval evaluation: datasets, corpus encoding, exact retrieval in the paper's five modes,
TREC run files and trec_eval metrics. `evaluate_retrieval` is the one call for in-memory params."""

from m3_jax.evaluation.datasets import RetrievalDataset, load_beir, load_dataset, load_miracl
from m3_jax.evaluation.evaluate import EvaluationResult, evaluate_embedder, evaluate_retrieval
from m3_jax.evaluation.heldout import evaluate_heldout
from m3_jax.evaluation.modes import RetrievalSettings
from m3_jax.scores import MODES

__all__ = [
    "MODES",
    "EvaluationResult",
    "RetrievalDataset",
    "RetrievalSettings",
    "evaluate_embedder",
    "evaluate_heldout",
    "evaluate_retrieval",
    "load_beir",
    "load_dataset",
    "load_miracl",
]
