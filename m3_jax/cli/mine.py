"""Mine hard negatives for FlagEmbedding jsonl training data, or a prepared training set
(FlagEmbedding's hn_mine.py rule).

    m3-jax mine train/demo_data/train.jsonl --model checkpoints/bge-m3 \\
        --output data/train_minedHN.jsonl --range 10-100 --negative-number 15
    m3-jax mine data/prepared --model checkpoints/bge-m3 --output data/prepared_minedHN

Every query ranks the candidate pool (every pos and neg text of the inputs, or --candidate-pool:
jsonl lines {"text"} or corpus lines {"id", "text", "title"}) in --mode; each record's negatives
are --negative-number texts sampled, with --seed, from the ranks START-END (0-based, END
excluded), leaving out its positives and its query; when too few remain, a random fill from the
pool below rank END tops them up. --max-score drops candidates scoring above it, and
--relative-margin M those scoring above (1 - M) x the query's lowest positive score (both apply
to the fill too). The output holds one record per input record, in input order, with "neg"
replaced and pos_scores / neg_scores dropped; it is written under a temporary name and renamed
when complete. With --cache, the encodings are kept in resumable shards.

A prepared set (`m3-jax data prepare` output, given alone) is mined from its token ids: the
queries as prepared (with its instructions, so --query-instruction does not apply), the pool its
passage table or --candidate-pool tokenized as its passages; a passage is a query's own text when
their token ids are equal. --output is then a new prepared set, ready to train on: the input's
passages (hard-linked) and queries, the new negatives, no teacher scores, buckets decided anew.
The model's tokenizer must be the one the set was prepared with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from m3_jax.cli.common import (
    add_max_length_arguments,
    add_model_arguments,
    floats,
    load_embedder,
    model_fingerprint,
    write_atomic,
)
from m3_jax.data.mined_set import check_output, write_with_negatives
from m3_jax.data.prepared import PreparedSet, is_prepared
from m3_jax.inference import DEFAULT_BATCH_SIZE
from m3_jax.input_files import InputError
from m3_jax.mining import (
    MINING_MODES,
    MiningResult,
    MiningSettings,
    mine,
    mine_prepared,
    mined_records,
    pool_from_records,
    read_candidate_pool,
    read_records,
)

DEFAULTS = MiningSettings()


def parse_range(text: str) -> tuple[int, int]:
    """ "START-END" → (START, END); MiningSettings checks 0 <= START < END."""
    parts = text.split("-")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(
            f"--range {text!r}: expected START-END, two integers with 0 <= START < END "
            "(e.g. 10-100)"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="jsonl files or directories")
    parser.add_argument(
        "--output",
        required=True,
        help="the mined jsonl file (for a prepared input: the prepared directory to write)",
    )
    parser.add_argument(
        "--candidate-pool",
        default=None,
        help='jsonl of {"text"} (or {"id", "text", "title"}) lines (None: the inputs\' texts)',
    )
    parser.add_argument("--mode", default=DEFAULTS.mode, choices=MINING_MODES, help="ranking")
    start, end = DEFAULTS.ranks
    parser.add_argument(
        "--range", default=f"{start}-{end}", help="0-based ranks START-END to sample from"
    )
    parser.add_argument(
        "--negative-number", type=int, default=DEFAULTS.negative_number, help="per record"
    )
    parser.add_argument(
        "--max-score", type=float, default=None, help="drop candidates scoring above it"
    )
    parser.add_argument(
        "--relative-margin",
        type=float,
        default=None,
        help="M in [0, 1): drop candidates above (1 - M) x the lowest positive score",
    )
    parser.add_argument(
        "--dense-sparse-weights",
        type=floats,
        default=DEFAULTS.dense_sparse_weights,
        help="dense,sparse weights of --mode sparse+dense",
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="sampling seed")
    parser.add_argument(
        "--query-instruction", default="", help="prepended to each query for encoding only"
    )
    add_max_length_arguments(parser)
    parser.add_argument("--cache", default=None, help="directory for resumable encoding shards")
    add_model_arguments(parser, batch_size=DEFAULT_BATCH_SIZE)


def summary(result: MiningResult, records: int, settings: MiningSettings) -> str:
    removed = result.removed
    lines = [
        f"{records} records, pool of {result.pool_size} texts, {settings.mode} ranks "
        f"{settings.ranks[0]}-{settings.ranks[1]}",
        f"negatives per record: {result.from_ranks / records:.2f} from the ranks, "
        f"{result.from_fill / records:.2f} random fill; "
        f"{result.short} records with fewer than {settings.negative_number}",
        f"candidates left out: {removed['positive']} positives, {removed['query']} queries, "
        f"{removed['max_score']} by --max-score, {removed['relative_margin']} by "
        "--relative-margin",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    settings = MiningSettings(
        mode=args.mode,
        ranks=parse_range(args.range),
        negative_number=args.negative_number,
        max_score=args.max_score,
        relative_margin=args.relative_margin,
        dense_sparse_weights=args.dense_sparse_weights,
        seed=args.seed,
    )
    prepared = [path for path in args.inputs if is_prepared(path)]
    if prepared:
        return run_prepared(args, settings, prepared)
    objects, records = read_records(args.inputs)
    pool = (
        read_candidate_pool(args.candidate_pool)
        if args.candidate_pool
        else pool_from_records(records)
    )
    embedder = load_embedder(
        args, query_max_length=args.query_max_length, passage_max_length=args.passage_max_length
    )
    result = mine(
        embedder,
        records,
        pool,
        settings,
        progress=not args.quiet,
        query_instruction=args.query_instruction,
        **encoding_options(args, embedder),
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = (
        json.dumps(row, ensure_ascii=False) + "\n"
        for row in mined_records(objects, result.negatives, pool)
    )
    write_atomic(out, lambda f: f.writelines(line.encode("utf-8") for line in lines))
    print(summary(result, len(records), settings))
    print(f"wrote {out}")
    return 0


def encoding_options(args: argparse.Namespace, embedder) -> dict:
    return {
        "cache_dir": args.cache,
        "model_fingerprint": model_fingerprint(args.model),
        "cache_settings": {
            "dtype": embedder.config.dtype,
            "attention_impl": embedder.config.attention_impl,
        },
    }


def run_prepared(args: argparse.Namespace, settings: MiningSettings, prepared: list[str]) -> int:
    if len(args.inputs) > 1:
        raise InputError(
            f"{prepared[0]}: a prepared set is mined by itself; give it as the only input "
            f"(got {len(args.inputs)} inputs)"
        )
    if args.query_instruction:
        raise InputError(
            f"--query-instruction: {prepared[0]} is a prepared set, whose queries carry the "
            "instructions they were prepared with; leave it out"
        )
    source = PreparedSet(prepared[0])
    check_output(source, args.output)
    pool = read_candidate_pool(args.candidate_pool) if args.candidate_pool else None
    embedder = load_embedder(
        args, query_max_length=args.query_max_length, passage_max_length=args.passage_max_length
    )
    mined = mine_prepared(
        embedder,
        source,
        settings,
        pool_texts=pool,
        progress=not args.quiet,
        **encoding_options(args, embedder),
    )
    provenance = {
        "from": str(source.path.absolute()),
        "model": model_fingerprint(args.model),
        "candidate_pool": None if pool is None else str(Path(args.candidate_pool).absolute()),
        "settings": dataclasses.asdict(settings),
    }
    write_with_negatives(
        source,
        mined.examples,
        mined.negatives,
        args.output,
        passage_lengths=mined.passage_lengths,
        new_passages=mined.new_passages,
        mined=provenance,
        progress=not args.quiet,
    )
    print(summary(mined.result, len(mined.negatives), settings))
    if mined.new_passages:
        print(f"{len(mined.new_passages)} candidate-pool passages added to the passage table")
    print(f"wrote {args.output} (a prepared set without teacher scores)")
    return 0
