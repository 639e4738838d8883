"""Export m3_jax weights to a BGE-M3 PyTorch directory (FlagEmbedding / transformers /
sentence-transformers layout).

    python tools/convert_to_pytorch.py runs/demo out/bge-m3-ft            # newest checkpoint of a run
    python tools/convert_to_pytorch.py runs/demo out/step-600 --step 600  # a chosen step
    python tools/convert_to_pytorch.py runs/demo/export out/final         # an m3_jax model directory
    python tools/convert_to_pytorch.py ckpt out --fp16-heads --bin        # like the release files

CKPT is an m3_jax model directory, a training run directory (`checkpoints/` inside), its
`checkpoints/` or one `checkpoints/STEP`. A run's model config and tokenizer are read from the run
(`model_info/` or `export/`); --config / --tokenizer name them otherwise.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from m3_jax.convert.to_torch import convert_to_pytorch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ckpt", help="m3_jax model directory, training run, or checkpoint step dir")
    parser.add_argument("out", help="output directory (must not exist or be empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument("--config", default=None, help="m3_jax_config.json of the run's model")
    parser.add_argument("--tokenizer", default=None, help="directory holding the tokenizer files")
    parser.add_argument(
        "--fp16-heads",
        action="store_true",
        help="write colbert_linear.pt/sparse_linear.pt in fp16, like the release (default fp32)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="encoder weights dtype (default float32, like the release's pytorch_model.bin)",
    )
    parser.add_argument(
        "--bin", action="store_true", help="also write pytorch_model.bin (torch pickle)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists and is not empty"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        out = convert_to_pytorch(
            args.ckpt,
            args.out,
            step=args.step,
            config_file=args.config,
            tokenizer_dir=args.tokenizer,
            weights_dtype=args.dtype,
            head_dtype="float16" if args.fp16_heads else "float32",
            write_bin=args.bin,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
