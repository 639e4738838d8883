"""Export m3_jax weights to a BGE-M3 PyTorch directory (FlagEmbedding / transformers /
sentence-transformers layout). The same as `m3-jax convert to-pytorch`.

    python tools/convert_to_pytorch.py runs/demo out/bge-m3-ft            # newest checkpoint of a run
    python tools/convert_to_pytorch.py runs/demo out/step-600 --step 600  # a chosen step
    python tools/convert_to_pytorch.py runs/demo/export out/final         # an m3_jax model directory
    python tools/convert_to_pytorch.py ckpt out --fp16-heads --bin        # like the release files

CKPT is an m3_jax model directory, a training run directory (`checkpoints/` inside), its
`checkpoints/` or one `checkpoints/STEP`. A run's model config and tokenizer are read from the run
(`model_info/` or `export/`); --config / --tokenizer name them otherwise.
"""

from __future__ import annotations

import sys

from m3_jax.cli.common import tool_main
from m3_jax.cli.convert import add_to_pytorch_arguments, run_to_pytorch


def main(argv: list[str] | None = None) -> int:
    return tool_main(__doc__, add_to_pytorch_arguments, run_to_pytorch, argv)


if __name__ == "__main__":
    sys.exit(main())
