"""`m3-jax`: BGE-M3 on JAX from the command line.

    m3-jax encode   --model DIR --output OUT (TEXT ... | --input FILE)   dense / sparse / colbert files
    m3-jax score    --model DIR (QUERY PASSAGE | --input FILE)          the five pair scores
    m3-jax convert  from-pytorch SRC OUT | to-pytorch CKPT OUT          weights between layouts
    m3-jax evaluate --model DIR --data DATASET                          nDCG / Recall / MRR
    m3-jax train    --config FILE [--config.KEY=VALUE ...]              the training loop
    m3-jax data prepare INPUT... --tokenizer DIR --out DIR              tokenize training data once
    m3-jax mine     INPUT... --model DIR --output OUT.jsonl             hard negatives from retrieval
    m3-jax teacher-score INPUT... --reranker DIR --output OUT.jsonl     pos_scores / neg_scores

`m3-jax COMMAND --help` shows every option with its default. A bad command line exits with 2, a
bad input file or other user error with 1 (the message names the file and line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from m3_jax.cli import convert, data, encode, evaluate, mine, score, teacher_score, train
from m3_jax.cli.common import HelpFormatter, run_command

COMMANDS = {
    "encode": (encode, "embed texts into .npy / .jsonl / shard files, resumably"),
    "score": (score, "score (query, passage) pairs in the five modes"),
    "convert": (convert, "convert weights from or to the PyTorch BGE-M3 layout"),
    "evaluate": (evaluate, "retrieval metrics on a BEIR or MIRACL dataset"),
    "train": (train, "train from a config file (as python train/main.py)"),
    "data": (data, "prepare training data: tokenized, deduplicated, bucketed (TFDS)"),
    "mine": (mine, "mine hard negatives for training records from the model's retrieval"),
    "teacher-score": (
        teacher_score,
        "add teacher scores from a reranker or an M3 model, resumably",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m3-jax", description=__doc__, formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        if module is train:
            # absl parses train's flags; listed here only so that `m3-jax --help` shows it.
            commands.add_parser(name, help=summary, add_help=False)
            continue
        sub = commands.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=HelpFormatter
        )
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return train.run(argv[1:])
    args = build_parser().parse_args(argv)
    return run_command(COMMANDS[args.command][0].run, args)
