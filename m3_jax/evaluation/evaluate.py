"""Retrieval evaluation end to end: dataset → encode → the five modes → runs → metrics.

`evaluate_retrieval` is the one call for in-memory params (the training loop's hook);
`evaluate_embedder` does the work for any `M3Embedder` (tools/evaluate.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from m3_jax.config import EvalConfig, ModelConfig
from m3_jax.evaluation.datasets import RetrievalDataset, load_dataset
from m3_jax.evaluation.encoding import encode_texts
from m3_jax.evaluation.metrics import MEASURES, mean_metrics
from m3_jax.evaluation.modes import (
    RERANK_SUFFIX,
    RetrievalSettings,
    required_outputs,
    rerank_run,
    run_modes,
)
from m3_jax.evaluation.trec import run_file_name, write_run
from m3_jax.inference import M3Embedder
from m3_jax.model import Params, model_from_params
from m3_jax.scores import MODES, canonical_modes
from m3_jax.tokenization import load_tokenizer

# evaluate_retrieval reuses the last embedder (and its compiled programs) when a training loop
# evaluates new params of the same model: only the weights are swapped.
_EMBEDDER_CACHE: dict[tuple, Any] = {}


@dataclasses.dataclass
class EvaluationResult:
    metrics: dict[str, dict[str, float]]  # mode → {'ndcg@10': ..., 'recall@100': ..., ...}
    runs: dict[str, dict[str, dict[str, float]]]  # mode → run

    def flat(self) -> dict[str, float]:
        """{'dense/ndcg@10': ..., ...}: one level, for logs and TensorBoard."""
        return {f"{mode}/{name}": v for mode, m in self.metrics.items() for name, v in m.items()}


def evaluate_embedder(
    embedder,
    dataset: RetrievalDataset,
    *,
    modes: Sequence[str] = MODES,
    ks: Sequence[int] = (10, 100),
    measures: Sequence[str] = MEASURES,
    settings: RetrievalSettings = RetrievalSettings(),  # noqa: B008 (frozen dataclass)
    query_max_length: int | None = None,
    passage_max_length: int | None = None,
    mesh: Mesh | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_fingerprint: str = "",
    shard_size: int = 8192,
    run_dir: str | os.PathLike | None = None,
    progress: bool = True,
    reranker: Any = None,
    rerank_mode: str = "dense",
    rerank_top_k: int = 100,
) -> EvaluationResult:
    """Encodes `dataset` with an `M3Embedder`, retrieves in each mode, scores the runs.

    cache_dir: corpus shards on disk (resumable; see evaluation.encoding), keyed by
    `model_fingerprint`. run_dir: writes `<mode>.trec` for every mode.
    reranker: an `m3_jax.Reranker`; the top `rerank_top_k` of `rerank_mode` (one of `modes`)
    reranked by it are one more result, named `<rerank_mode>+rerank`.
    """
    if reranker is not None and rerank_mode not in canonical_modes(modes):
        raise ValueError(
            f"rerank mode {rerank_mode!r} is not among the evaluated modes {list(modes)}"
        )
    outputs = required_outputs(modes)
    corpus = encode_texts(
        embedder,
        dataset.doc_texts,
        max_length=passage_max_length or embedder.passage_max_length,
        outputs=outputs,
        shard_size=shard_size,
        cache_dir=None if cache_dir is None else Path(cache_dir) / "corpus",
        model_fingerprint=model_fingerprint,
        progress=progress,
        desc="corpus",
    )
    queries = encode_texts(
        embedder,
        dataset.query_texts,
        max_length=query_max_length or embedder.query_max_length,
        outputs=outputs,
        shard_size=max(shard_size, len(dataset.query_texts)),
        progress=progress,
        desc="queries",
    )
    runs = run_modes(
        queries, corpus, dataset.query_ids, dataset.doc_ids, modes, settings, mesh=mesh
    )
    if reranker is not None:
        runs[rerank_mode + RERANK_SUFFIX] = rerank_run(
            runs[rerank_mode],
            reranker,
            dict(zip(dataset.query_ids, dataset.query_texts, strict=True)),
            dict(zip(dataset.doc_ids, dataset.doc_texts, strict=True)),
            rerank_top_k,
        )
    metrics = {mode: mean_metrics(run, dataset.qrels, ks, measures) for mode, run in runs.items()}
    if run_dir is not None:
        for mode, run in runs.items():
            write_run(run, Path(run_dir) / run_file_name(mode), tag=f"m3_jax-{mode}")
    return EvaluationResult(metrics, runs)


def evaluate_retrieval(
    model_config: ModelConfig,
    params: Params,
    tokenizer_dir: str | os.PathLike,
    dataset: RetrievalDataset | str | os.PathLike,
    *,
    modes: Sequence[str] = MODES,
    k: int | Sequence[int] = EvalConfig.k,
    measures: Sequence[str] = MEASURES,
    settings: RetrievalSettings = RetrievalSettings(),  # noqa: B008 (frozen dataclass)
    split: str | None = None,
    batch_size: int = EvalConfig.batch_size,
    query_max_length: int | None = None,
    passage_max_length: int | None = None,
    dtype: str = "float32",
    mesh: Mesh | None = None,
    run_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Retrieval metrics of in-memory params: {'dense/ndcg@10': ..., 'all/recall@10': ..., ...}.

    dataset: a RetrievalDataset, or a BEIR / MIRACL directory (`split` picks the qrels file).
    k: one cutoff or several; measures: any of ndcg, recall, mrr. The model runs in `dtype`
    (float32 by default, whatever the training compute dtype). params may be sharded jax arrays
    or numpy; they are not copied to the host. Repeated calls for the same model config reuse
    the compiled encoder programs (one M3Embedder is cached; its weights are replaced).
    """
    if not isinstance(dataset, RetrievalDataset):
        dataset = load_dataset(dataset, split)
    ks = [k] if isinstance(k, int) else list(k)
    config = model_config.replace(dtype=dtype)
    key = (config, str(tokenizer_dir), batch_size, query_max_length, passage_max_length)
    embedder = _EMBEDDER_CACHE.get(key)
    if embedder is None:
        _EMBEDDER_CACHE.clear()  # keep one model's programs and weights, not every one seen
        embedder = M3Embedder(
            model_from_params(config, params),
            load_tokenizer(tokenizer_dir),
            batch_size=batch_size,
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            show_progress=progress,
        )
        _EMBEDDER_CACHE[key] = embedder
    else:
        embedder.load_params(params)
    embedder.show_progress = progress
    result = evaluate_embedder(
        embedder,
        dataset,
        modes=modes,
        ks=ks,
        measures=measures,
        settings=settings,
        mesh=mesh,
        run_dir=run_dir,
        progress=progress,
    )
    return result.flat()
