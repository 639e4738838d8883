"""Import released BGE-M3 weights (PyTorch/FlagEmbedding layout) into an m3_jax model directory.

    python tools/convert_from_pytorch.py BAAI/bge-m3 checkpoints/bge-m3      # hub id (needs network)
    python tools/convert_from_pytorch.py /path/to/bge-m3 checkpoints/bge-m3  # local directory

The output holds `m3_jax_config.json`, orbax `params/` and the tokenizer files, and loads with
`M3Embedder.from_pretrained(OUT)` without torch. The same as `m3-jax convert from-pytorch`.
"""

from __future__ import annotations

import sys

from m3_jax.cli.common import tool_main
from m3_jax.cli.convert import add_from_pytorch_arguments, run_from_pytorch


def main(argv: list[str] | None = None) -> int:
    return tool_main(__doc__, add_from_pytorch_arguments, run_from_pytorch, argv)


if __name__ == "__main__":
    sys.exit(main())
