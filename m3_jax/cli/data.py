"""Prepare training data once: validated, tokenized, deduplicated and bucketed by length.

    m3-jax data prepare data/train.jsonl --tokenizer checkpoints/bge-m3 --out data/prepared
    m3-jax data prepare data/en data/zh data/mldr_no_in_batch_neg --tokenizer DIR --out DIR \\
        --num-workers 8
    m3-jax data prepare data/pairs --tokenizer DIR --out DIR --beam='--runner=FlinkRunner ...'

Each input file, and each .jsonl/.json file of an input directory, is one dataset (every training
batch comes from one dataset, as in FlagEmbedding). The output is a TFDS dataset in ArrayRecord files that `data.train_files`
takes; rerunning an interrupted command continues it, and rerunning a finished one does nothing.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from m3_jax.cli.common import add_subcommands
from m3_jax.data.prepare import PrepareResult, PrepareSettings, prepare
from m3_jax.data.prepare_beam import prepare_with_beam
from m3_jax.data.prepared import PASSAGES_DIR


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs", nargs="+", help="jsonl files or directories of them (one dataset per file)"
    )
    parser.add_argument("--tokenizer", required=True, help="directory holding the tokenizer files")
    parser.add_argument("--out", required=True, help="the prepared directory to write")
    defaults = PrepareSettings(tokenizer="")
    parser.add_argument(
        "--query-max-len",
        type=int,
        default=defaults.query_max_len,
        help="queries are truncated to this many tokens (training may truncate shorter)",
    )
    parser.add_argument(
        "--passage-max-len",
        type=int,
        default=defaults.passage_max_len,
        help="passages are truncated to this many tokens (training may truncate shorter)",
    )
    parser.add_argument(
        "--query-instruction", default=None, help="prepended to queries (a record's prompt wins)"
    )
    parser.add_argument("--passage-instruction", default=None, help="prepended to passages")
    parser.add_argument(
        "--instruction-format",
        default=defaults.instruction_format,
        help="how an instruction and a text are joined",
    )
    parser.add_argument(
        "--num-workers", type=int, default=1, help="processes tokenizing and writing in parallel"
    )
    parser.add_argument(
        "--beam",
        nargs="?",
        const="",
        default=None,
        metavar="OPTIONS",
        help="run on Apache Beam (the beam extra) with these pipeline options, e.g. "
        "--beam='--runner=DataflowRunner --project=P ...'; --beam alone: the DirectRunner",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an output prepared from other inputs or settings",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run_prepare(args: argparse.Namespace) -> int:
    settings = PrepareSettings(
        tokenizer=args.tokenizer,
        query_max_len=args.query_max_len,
        passage_max_len=args.passage_max_len,
        query_instruction=args.query_instruction,
        passage_instruction=args.passage_instruction,
        instruction_format=args.instruction_format,
    )
    start = time.perf_counter()
    if args.beam is not None:
        if args.num_workers != 1:
            raise ValueError(
                "--num-workers is the local prepare's; with --beam the runner's options set the "
                "parallelism (e.g. --beam='--direct_num_workers=16 "
                "--direct_running_mode=multi_processing')"
            )
        result = prepare_with_beam(
            args.inputs,
            args.out,
            settings,
            beam_args=shlex.split(args.beam),
            overwrite=args.overwrite,
        )
    else:
        result = prepare(
            args.inputs,
            args.out,
            settings,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    if result.already_prepared:
        print(f"{result.out}: already prepared from these inputs and settings; nothing to do")
        return 0
    print(summary_table(result))
    print(f"wrote {result.out} in {time.perf_counter() - start:.1f}s")
    return 0


def summary_table(result: PrepareResult) -> str:
    """One row per dataset and length bucket, then the totals and the size on disk."""
    m = result.manifest
    rows = [("dataset", "bucket", "examples", "max query", "max passage")]
    for d in m.datasets:
        for b in d.buckets:
            name = Path(d.source).name
            rows.append(
                (name, f"<={b.passage_len}", b.examples, b.max_query_len, b.max_passage_len)
            )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(v).rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    size = sum(f.stat().st_size for f in result.out.rglob("*") if f.is_file())
    passages_size = sum(
        f.stat().st_size for f in (result.out / PASSAGES_DIR).rglob("*") if f.is_file()
    )
    records = sum(d.records for d in m.datasets)
    lines.append(
        f"{records} records in {len(m.datasets)} dataset(s); {m.passages} distinct passages; "
        f"tokens: {m.query_tokens} in queries, {m.passage_tokens} in passages; "
        f"{size / 2**20:.1f} MiB on disk ({passages_size / 2**20:.1f} MiB of passages)"
    )
    return "\n".join(lines)


ACTIONS = {"prepare": (add_prepare_arguments, run_prepare, "jsonl -> a prepared training set")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser, ACTIONS, "ACTION", __doc__)


def run(args: argparse.Namespace) -> int:
    return args.run(args)
