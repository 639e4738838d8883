"""What every command shares: the help format, the model options, and error reporting."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from m3_jax.config import ATTENTION_IMPLS
from m3_jax.inference import M3Embedder

# Errors a user can fix (bad input, missing files, changed settings, a diverged loss): one line on
# stderr, exit 1. argparse reports bad command lines itself, with exit code 2. Any other exception
# is a bug: its traceback, then a line saying so.
USER_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    ValueError,
    ImportError,
    FloatingPointError,
    ConnectionError,  # a hub download without network
)
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


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


def add_max_length_arguments(parser: argparse.ArgumentParser) -> None:
    """--query-max-length and --passage-max-length, for `load_embedder`'s keyword arguments."""
    parser.add_argument(
        "--query-max-length", type=int, default=None, help="query tokens (None: 512 or the model's)"
    )
    parser.add_argument(
        "--passage-max-length",
        type=int,
        default=None,
        help="passage tokens (None: 512 or the model's)",
    )


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


def model_fingerprint(model: str) -> str:
    """What names `--model` in an embedding cache's manifest: a local path resolved (the same
    directory reached another way is the same model), a hub id as given."""
    local = Path(model).expanduser()
    return str(local.resolve()) if local.exists() else model


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Writes through a temporary file, so an interrupted run never leaves a truncated output."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        write(f)
    os.replace(tmp, path)


def setup_logging() -> None:
    """m3_jax's INFO lines, and the libraries' warnings, with timestamps on stderr (the libraries'
    INFO chatter, such as JAX looking for a TPU, is left out). `force`: an import may have
    configured the root logger already, and basicConfig alone would keep its format."""
    logging.basicConfig(
        level=logging.WARNING, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, force=True
    )
    logging.getLogger("m3_jax").setLevel(logging.INFO)


def print_error(message: object) -> None:
    """One `error: ...` line on stderr (a message's own line breaks joined)."""
    text = " ".join(str(message).split("\n"))
    print(f"error: {text}", file=sys.stderr)


def report_errors(run: Callable[[], int]) -> int:
    """`run()`'s exit code; a user error becomes one `error:` line and exit code 1, Ctrl-C exit
    code 130, and any other exception its traceback plus a line naming it a bug."""
    try:
        return run()
    except USER_ERRORS as e:
        print_error(e)
        return 1
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except Exception as e:
        traceback.print_exc()
        print_error(f"the {type(e).__name__} above is a bug in m3_jax; please report it")
        return 1


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs a command with `setup_logging` and `report_errors`."""
    setup_logging()
    return report_errors(lambda: run(args))


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
