"""What every command shares: the help format, the model options, and error reporting."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from m3_jax.config import ATTENTION_IMPLS
from m3_jax.inference import M3Embedder

# Errors a user can fix (bad input, missing files, changed settings): one line on stderr, exit 1.
# argparse reports bad command lines itself, with exit code 2.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, ImportError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout (usage examples) and shows every option's default."""


def floats(text: str) -> tuple[float, ...]:
    """A comma-separated list of numbers, e.g. "1,0.3"."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def add_model_arguments(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="m3_jax model directory, training run, BGE-M3 PyTorch directory or hub id",
    )
    parser.add_argument(
        "--dtype", default=None, help="compute dtype, e.g. bfloat16 (None: the model's, float32)"
    )
    parser.add_argument(
        "--attention-impl",
        default=None,
        choices=ATTENTION_IMPLS,
        help="attention implementation (None: the model's, xla)",
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, help="texts per batch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_embedder(args: argparse.Namespace, **kwargs: Any):
    """An M3Embedder from the options of `add_model_arguments` (kwargs go to its constructor)."""
    return M3Embedder.from_pretrained(
        args.model,
        dtype=args.dtype,
        attention_impl=args.attention_impl,
        batch_size=args.batch_size,
        show_progress=not args.quiet,
        **kwargs,
    )


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs a command; a user error becomes `error: ...` on stderr and exit code 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def tool_main(
    description: str | None,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None = None,
) -> int:
    """The `main` of a tools/*.py script that is one `m3-jax` command under another name."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_arguments(parser)
    return run_command(run, parser.parse_args(argv))


Subcommands = dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]]


def add_subcommands(
    parser: argparse.ArgumentParser, table: Subcommands, metavar: str, description: str | None
) -> None:
    """One sub-parser per `table` entry (name -> (add_arguments, run, summary)); the chosen
    one's run is `args.run`."""
    subs = parser.add_subparsers(dest=metavar.lower(), required=True, metavar=metavar)
    for name, (add, run, summary) in table.items():
        sub = subs.add_parser(
            name, help=summary, description=description, formatter_class=HelpFormatter
        )
        add(sub)
        sub.set_defaults(run=run)
