"""Add teacher scores (pos_scores / neg_scores) to FlagEmbedding jsonl training data.

    m3-jax teacher-score data/train_minedHN.jsonl --reranker BAAI/bge-reranker-v2-m3 \\
        --output data/train_minedHN_scored.jsonl
    m3-jax teacher-score data/train_minedHN.jsonl --teacher m3:checkpoints/bge-m3 \\
        --output data/train_minedHN_self.jsonl

Every (query, passage) pair of every record is scored and written back index-aligned with its
`pos` / `neg`: with --reranker (or --teacher reranker:DIR), the cross-encoder's raw logit; with
--teacher m3:DIR, the M3 model's ensemble score (dense + 0.3 sparse + colbert) divided by the
0.02 training temperature (the paper's self-teacher). Records are scored in chunks appended to
OUT.partial; a killed run, rerun with the same command, continues after the last chunk written
and never scores a pair twice. Existing pos_scores / neg_scores are replaced.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m3_jax.cli.common import floats, model_fingerprint
from m3_jax.config import ATTENTION_IMPLS
from m3_jax.data.records import data_files
from m3_jax.inference import DEFAULT_BATCH_SIZE, DEFAULT_MAX_LENGTH, M3Embedder
from m3_jax.mining import read_records
from m3_jax.reranker import Reranker
from m3_jax.teacher_scores import (
    M3_TEACHER_TEMPERATURE,
    M3_TEACHER_WEIGHTS,
    inputs_fingerprint,
    m3_scorer,
    reranker_scorer,
    write_teacher_scores,
)

TEACHER_KINDS = ("reranker", "m3")


def parse_teacher(text: str) -> tuple[str, str]:
    """ "KIND:PATH" → (KIND, PATH) for KIND in TEACHER_KINDS."""
    kind, sep, path = text.partition(":")
    if not sep or kind not in TEACHER_KINDS or not path:
        raise ValueError(
            f"--teacher {text!r}: expected reranker:DIR or m3:DIR (a directory or hub id)"
        )
    return kind, path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="jsonl files or directories")
    parser.add_argument("--output", required=True, help="the scored jsonl file")
    teacher = parser.add_mutually_exclusive_group(required=True)
    teacher.add_argument(
        "--reranker", default=None, help="cross-encoder directory or hub id (= reranker:DIR)"
    )
    teacher.add_argument("--teacher", default=None, help="reranker:DIR or m3:DIR")
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="tokens per pair / passage"
    )
    parser.add_argument(
        "--query-max-length",
        type=int,
        default=None,
        help="query tokens (None: 3/4 of --max-length for a reranker, 512 for m3)",
    )
    parser.add_argument(
        "--m3-weights",
        type=floats,
        default=M3_TEACHER_WEIGHTS,
        help="dense,sparse,colbert weights of the m3 teacher",
    )
    parser.add_argument(
        "--m3-temperature",
        type=float,
        default=M3_TEACHER_TEMPERATURE,
        help="the m3 teacher's ensemble score is divided by it",
    )
    parser.add_argument("--chunk-records", type=int, default=1024, help="records per chunk")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="pairs per batch"
    )
    parser.add_argument("--dtype", default=None, help="compute dtype (None: float32)")
    parser.add_argument(
        "--attention-impl", default=None, choices=ATTENTION_IMPLS, help="None: the model's (xla)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    kind, path = ("reranker", args.reranker) if args.reranker else parse_teacher(args.teacher)
    out = Path(args.output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --output or delete it")
    objects, records = read_records(args.inputs)
    model_kw = dict(
        dtype=args.dtype, attention_impl=args.attention_impl, batch_size=args.batch_size
    )
    settings = {"max_length": args.max_length, "query_max_length": args.query_max_length}
    if kind == "reranker":
        reranker = Reranker.from_pretrained(
            path,
            max_length=args.max_length,
            query_max_length=args.query_max_length,
            show_progress=False,
            **model_kw,
        )
        scorer = reranker_scorer(reranker)
    else:
        embedder = M3Embedder.from_pretrained(
            path,
            query_max_length=args.query_max_length,
            passage_max_length=args.max_length,
            show_progress=False,
            **model_kw,
        )
        scorer = m3_scorer(embedder, args.m3_weights, args.m3_temperature)
        settings.update(weights=list(args.m3_weights), temperature=args.m3_temperature)
    manifest = {
        "inputs": inputs_fingerprint(data_files(args.inputs)),
        "teacher": {"kind": kind, "model": model_fingerprint(path), "dtype": args.dtype},
        "settings": settings,
    }
    summary = write_teacher_scores(
        objects,
        records,
        scorer,
        out,
        manifest=manifest,
        chunk_records=args.chunk_records,
        progress=not args.quiet,
    )
    resumed = f", resumed after {summary.resumed_from}" if summary.resumed_from else ""
    print(f"{summary.records} records{resumed}: {summary.pairs_scored} pairs scored by {kind}")
    print(f"wrote {out}")
    return 0
