"""Retrieval evaluation of an M3 model in the paper's modes, on a BEIR- or MIRACL-format dataset.

    m3-jax evaluate --model checkpoints/bge-m3 --data data/scifact \\
        --modes dense,sparse,colbert,sparse+dense,colbert+sparse+dense --out results/scifact

--model is an m3_jax model directory, a training run or a BGE-M3 PyTorch directory. Prints a table like the paper's
(metrics as rows, modes as columns) and writes OUT/metrics.json and one TREC run file per mode
(OUT/runs/<mode>.trec; OUT defaults to eval_results/<data dir name>). With --cache, corpus
embeddings are kept in resumable shards. With --rerank DIR, a cross-encoder (bge-reranker-v2-m3
or any XLMRobertaForSequenceClassification with one label) rescores the top --rerank-top-k of
--rerank-mode: one more column, "<mode>+rerank".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from m3_jax.cli.common import (
    add_max_length_arguments,
    add_model_arguments,
    floats,
    load_embedder,
    model_fingerprint,
)
from m3_jax.config import EvalConfig
from m3_jax.evaluation.datasets import load_dataset
from m3_jax.evaluation.evaluate import evaluate_embedder
from m3_jax.evaluation.modes import RetrievalSettings
from m3_jax.reranker import Reranker
from m3_jax.scores import MODE_ALIASES, MODES, canonical_modes

DEFAULTS = RetrievalSettings()


def format_table(metrics: dict[str, dict[str, float]], scale: float = 100.0) -> str:
    """Metric rows × mode columns, values ×100 with one decimal like the paper."""
    modes = list(metrics)
    names = list(next(iter(metrics.values())))
    width = max(12, *(len(m) + 2 for m in modes))
    lines = ["metric".ljust(12) + "".join(m.rjust(width) for m in modes)]
    for name in names:
        cells = "".join(f"{metrics[m][name] * scale:.1f}".rjust(width) for m in modes)
        lines.append(name.ljust(12) + cells)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="BEIR or MIRACL dataset directory")
    parser.add_argument(
        "--split", default=None, help="qrels split (None: BEIR test, MIRACL dev, else the only one)"
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated of {', '.join(MODES)} (aliases: {', '.join(MODE_ALIASES)}); "
        "None: all five",
    )
    parser.add_argument("--k", default="10,100", help="metric cutoffs, e.g. 10,100")
    parser.add_argument("--measures", default="ndcg,recall,mrr", help="ndcg, recall, mrr")
    parser.add_argument(
        "--top-k", type=int, default=DEFAULTS.top_k, help="first-stage depth (paper: 1000)"
    )
    parser.add_argument(
        "--rerank-depth",
        type=int,
        default=DEFAULTS.rerank_depth,
        help="dense candidates reranked by colbert and colbert+sparse+dense",
    )
    parser.add_argument(
        "--dense-sparse-weights",
        type=floats,
        default=DEFAULTS.dense_sparse_weights,
        help="dense,sparse weights of sparse+dense",
    )
    parser.add_argument(
        "--all-weights",
        type=floats,
        default=DEFAULTS.all_weights,
        help="dense,sparse,colbert weights of colbert+sparse+dense",
    )
    add_max_length_arguments(parser)
    parser.add_argument(
        "--rerank", default=None, help="a cross-encoder (directory or hub id) to rerank with"
    )
    parser.add_argument("--rerank-mode", default="dense", help="the mode whose top-k is reranked")
    parser.add_argument("--rerank-top-k", type=int, default=100, help="documents reranked")
    parser.add_argument(
        "--rerank-max-length", type=int, default=512, help="tokens per reranked pair"
    )
    parser.add_argument("--max-queries", type=int, default=None, help="evaluate the first N")
    parser.add_argument("--cache", default=None, help="directory for resumable corpus shards")
    parser.add_argument(
        "--out",
        default=None,
        help="directory for metrics.json and runs/<mode>.trec (None: eval_results/<data dir name>)",
    )
    add_model_arguments(parser, batch_size=EvalConfig.batch_size)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else Path("eval_results") / Path(args.data).resolve().name
    start = time.perf_counter()
    modes = MODES if args.modes is None else args.modes.split(",")
    rerank_mode = canonical_modes([args.rerank_mode])[0]
    if args.rerank and rerank_mode not in canonical_modes(modes):
        raise ValueError(f"--rerank-mode {args.rerank_mode}: not among --modes {','.join(modes)}")
    settings = RetrievalSettings(
        top_k=args.top_k,
        rerank_depth=args.rerank_depth,
        dense_sparse_weights=args.dense_sparse_weights,
        all_weights=args.all_weights,
    )
    dataset = load_dataset(args.data, args.split)
    if args.max_queries:
        dataset = dataset.subset(args.max_queries)
    embedder = load_embedder(
        args, query_max_length=args.query_max_length, passage_max_length=args.passage_max_length
    )
    reranker = None
    if args.rerank:
        reranker = Reranker.from_pretrained(
            args.rerank,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_length=args.rerank_max_length,
            show_progress=not args.quiet,
        )
    result = evaluate_embedder(
        embedder,
        dataset,
        modes=modes,
        ks=[int(k) for k in args.k.split(",")],
        measures=[m.strip() for m in args.measures.split(",")],
        settings=settings,
        cache_dir=args.cache,
        model_fingerprint=model_fingerprint(args.model),
        run_dir=out / "runs",
        progress=not args.quiet,
        reranker=reranker,
        rerank_mode=rerank_mode,
        rerank_top_k=args.rerank_top_k,
    )
    seconds = time.perf_counter() - start
    print(
        f"{dataset.name}: {len(dataset.query_ids)} queries, {len(dataset.doc_ids)} documents, "
        f"{seconds:.1f}s"
    )
    print(format_table(result.metrics))
    summary = {
        "model": args.model,
        "data": args.data,
        "dataset": dataset.name,
        "num_queries": len(dataset.query_ids),
        "num_docs": len(dataset.doc_ids),
        "settings": dataclasses.asdict(settings),
        "rerank": args.rerank
        and {"model": args.rerank, "mode": args.rerank_mode, "top_k": args.rerank_top_k},
        "metrics": result.metrics,
        "seconds": round(seconds, 1),
    }
    path = out / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {path} and {out / 'runs'}/<mode>.trec")
    return 0
