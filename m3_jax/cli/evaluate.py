"""Retrieval evaluation of an M3 model in the paper's modes, on a BEIR- or MIRACL-format dataset.

    m3-jax evaluate --model checkpoints/bge-m3 --data data/scifact \\
        --modes dense,sparse,colbert,sparse+dense,colbert+sparse+dense --out results/scifact

--model is an m3_jax model directory, a training run or a BGE-M3 PyTorch directory. Prints a table like the paper's
(metrics as rows, modes as columns) and writes OUT/metrics.json and one TREC run file per mode
(OUT/runs/<mode>.trec; OUT defaults to eval_results/<data dir name>). With --cache, corpus
embeddings are kept in resumable shards. With --rerank DIR, a cross-encoder (bge-reranker-v2-m3
or any XLMRobertaForSequenceClassification with one label) rescores the top --rerank-top-k of
--rerank-mode: one more column, "<mode>+rerank".

With --mteb, the evaluation runs through MTEB (`pip install "m3_jax[mteb]"`), each retrieval
task in each of --modes (m3_jax's own retrieval behind MTEB's search protocol, so the numbers
equal this command's), other MTEB task types with the dense vectors:

    m3-jax evaluate --model BAAI/bge-m3 --mteb MIRACLRetrieval --mteb-languages ara,ben
    m3-jax evaluate --model runs/demo_cpu --data train/demo_data/heldout_beir --mteb

--mteb TASK,... names MTEB tasks (their data come from the Hugging Face hub); --mteb alone
evaluates --data as a local MTEB task. MTEB's result files go to OUT/mteb.
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
from m3_jax.integrations.mteb import evaluate_tasks, import_mteb, local_retrieval_task
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
    parser.add_argument(
        "--data", default=None, help="BEIR or MIRACL dataset directory (needed unless --mteb TASK)"
    )
    parser.add_argument(
        "--mteb",
        nargs="?",
        const="",
        default=None,
        metavar="TASK,...",
        help="evaluate through MTEB: these MTEB tasks, or with no names --data as a local task",
    )
    parser.add_argument(
        "--mteb-languages",
        default=None,
        help="comma-separated: the hub tasks' languages to run (ISO 639-3, e.g. ara,ben; None: "
        "all), or the local task's (e.g. eng-Latn, the default)",
    )
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
    if args.mteb is not None:
        return run_mteb(args)
    if args.data is None:
        raise ValueError(
            "--data: required (a BEIR or MIRACL dataset directory), unless --mteb TASK"
        )
    out = Path(args.out) if args.out else Path("eval_results") / Path(args.data).resolve().name
    start = time.perf_counter()
    modes = MODES if args.modes is None else args.modes.split(",")
    rerank_mode = canonical_modes([args.rerank_mode])[0]
    if args.rerank and rerank_mode not in canonical_modes(modes):
        raise ValueError(f"--rerank-mode {args.rerank_mode}: not among --modes {','.join(modes)}")
    settings = retrieval_settings(args)
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


def retrieval_settings(args: argparse.Namespace) -> RetrievalSettings:
    return RetrievalSettings(
        top_k=args.top_k,
        rerank_depth=args.rerank_depth,
        dense_sparse_weights=args.dense_sparse_weights,
        all_weights=args.all_weights,
    )


def mteb_tasks(args: argparse.Namespace) -> tuple[list, str]:
    """(the MTEB tasks --mteb names, or --data as a local task; a name for OUT)."""
    languages = args.mteb_languages and [c.strip() for c in args.mteb_languages.split(",")]
    if args.mteb == "":
        if args.data is None:
            raise ValueError(
                "--mteb without task names evaluates --data as a local task: give --data"
            )
        task = local_retrieval_task(
            args.data,
            split=args.split,
            languages=languages or ["eng-Latn"],
            max_queries=args.max_queries,
        )
        return [task], Path(args.data).resolve().name
    if args.data is not None or args.max_queries:
        raise ValueError(
            "--mteb TASK,...: MTEB loads the tasks' data; leave out --data and --max-queries"
        )
    names = [n.strip() for n in args.mteb.split(",") if n.strip()]
    splits = None if args.split is None else [args.split]
    try:
        tasks = import_mteb().get_tasks(tasks=names, languages=languages, eval_splits=splits)
    except (KeyError, ValueError) as e:
        raise ValueError(f"--mteb {args.mteb}: {e.args[0]}") from None
    return list(tasks), "mteb-" + "-".join(names)


def run_mteb(args: argparse.Namespace) -> int:
    if args.rerank:
        raise ValueError("--rerank: not available with --mteb (MTEB scores one model at a time)")
    tasks, label = mteb_tasks(args)
    out = Path(args.out) if args.out else Path("eval_results") / label
    modes = canonical_modes(MODES if args.modes is None else args.modes.split(","))
    embedder = load_embedder(
        args, query_max_length=args.query_max_length, passage_max_length=args.passage_max_length
    )
    start = time.perf_counter()
    name = "m3_jax/" + (
        Path(args.model).resolve().name
        if Path(args.model).exists()
        else args.model.replace("/", "__")
    )
    try:
        results = evaluate_tasks(
            embedder,
            tasks,
            modes,
            name=name,
            results_dir=out / "mteb",
            batch_size=args.batch_size,
            progress=not args.quiet,
            settings=retrieval_settings(args),
            cache_dir=args.cache,
            model_fingerprint=model_fingerprint(args.model),
        )
    except ConnectionError as e:
        raise ConnectionError(
            f"--mteb {args.mteb}: {e}; MTEB fetches its tasks' data from the Hugging Face hub "
            "(offline, evaluate a local copy: --data DIR --mteb)"
        ) from None
    seconds = time.perf_counter() - start
    for task, by_mode in results.items():
        print(f"{task} (MTEB main score x100, {seconds:.1f}s)")
        print(format_mteb_table(by_mode))
    path = out / "mteb_metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, "modes": list(modes), "results": results}
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"wrote {path} and MTEB's result files under {out / 'mteb'}")
    return 0


def format_mteb_table(by_mode: dict[str, dict[str, dict]]) -> str:
    """split/subset rows (and their mean) x mode columns of MTEB's main score, x100."""
    modes = list(by_mode)
    rows = list(next(iter(by_mode.values())))
    main = {m: {r: float(by_mode[m][r]["main_score"]) for r in rows} for m in modes}
    if len(rows) > 1:
        for m in modes:
            main[m]["mean"] = sum(main[m].values()) / len(rows)
        rows.append("mean")
    width = max(12, *(len(m) + 2 for m in modes))
    first = max(12, *(len(r) + 2 for r in rows))
    lines = ["subset".ljust(first) + "".join(m.rjust(width) for m in modes)]
    for r in rows:
        lines.append(
            r.ljust(first) + "".join(f"{main[m][r] * 100:.2f}".rjust(width) for m in modes)
        )
    return "\n".join(lines)
