"""Prepare jsonl training data into a TFDS / ArrayRecord set: tokenized once, bucketed by length.

    python tools/prepare_data.py data/train.jsonl --tokenizer checkpoints/bge-m3 --out data/prepared

The same as `m3-jax data prepare`; `--help` lists the options.
"""

from __future__ import annotations

import sys

from m3_jax.cli.common import tool_main
from m3_jax.cli.data import add_prepare_arguments, run_prepare


def main(argv: list[str] | None = None) -> int:
    return tool_main(__doc__, add_prepare_arguments, run_prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
