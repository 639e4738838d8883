"""Score (query, passage) pairs in the five modes of `M3Embedder.compute_score`.

    m3-jax score --model checkpoints/bge-m3 "what is BGE M3?" "BGE M3 is an embedding model"
    m3-jax score --model checkpoints/bge-m3 --input pairs.tsv --output scores.jsonl

--input: .tsv (query <TAB> passage) or .jsonl (--query-field, --passage-field). Writes one JSON
object per pair, in input order, with the scores "dense", "sparse", "colbert", "sparse+dense" and
"colbert+sparse+dense" (the last two weighted by --weights dense,sparse,colbert), to stdout or
--output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m3_jax.cli.common import add_model_arguments, floats, load_embedder
from m3_jax.cli.inputs import read_pairs
from m3_jax.inference import DEFAULT_BATCH_SIZE
from m3_jax.input_files import InputError
from m3_jax.scores import MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pair", nargs="*", default=[], help="a query and a passage (or --input)")
    parser.add_argument("--input", default=None, help=".tsv or .jsonl file of pairs")
    parser.add_argument("--query-field", default="query", help="the query's key in .jsonl input")
    parser.add_argument(
        "--passage-field", default="passage", help="the passage's key in .jsonl input"
    )
    parser.add_argument("--output", default=None, help=".jsonl file for the scores (None: stdout)")
    parser.add_argument(
        "--weights", type=floats, default=(1.0, 1.0, 1.0), help="dense,sparse,colbert weights"
    )
    parser.add_argument(
        "--max-query-length", type=int, default=None, help="query tokens (None: 512 or the model's)"
    )
    parser.add_argument(
        "--max-passage-length",
        type=int,
        default=None,
        help="passage tokens (None: 512 or the model's)",
    )
    add_model_arguments(parser, batch_size=DEFAULT_BATCH_SIZE)


def _pairs(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.input and not args.pair:
        return read_pairs(args.input, args.query_field, args.passage_field)
    if args.input or len(args.pair) != 2:
        raise InputError("give a query and a passage on the command line, or --input FILE")
    return [(args.pair[0], args.pair[1])]


def run(args: argparse.Namespace) -> int:
    pairs = _pairs(args)
    if len(args.weights) != 3:
        raise InputError(f"--weights needs 3 values (dense,sparse,colbert), got {args.weights}")
    embedder = load_embedder(args)
    result = embedder.compute_score(
        pairs,
        max_query_length=args.max_query_length,
        max_passage_length=args.max_passage_length,
        weights_for_different_modes=args.weights,
    )
    lines = "".join(
        json.dumps({mode: result[mode][i] for mode in MODES}) + "\n" for i in range(len(pairs))
    )
    if args.output is None:
        sys.stdout.write(lines)
    else:
        Path(args.output).write_text(lines)
    return 0
