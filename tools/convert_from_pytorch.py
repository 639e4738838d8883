"""Import released BGE-M3 weights (PyTorch/FlagEmbedding layout) into an m3_jax model directory.

    python tools/convert_from_pytorch.py BAAI/bge-m3 checkpoints/bge-m3      # hub id (needs network)
    python tools/convert_from_pytorch.py /path/to/bge-m3 checkpoints/bge-m3  # local directory

The output holds `m3_jax_config.json`, orbax `params/` and the tokenizer files, and loads with
`M3Embedder.from_pretrained(OUT)` without torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from m3_jax.convert.from_torch import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "src", help="BGE-M3 directory (config.json, weights, head .pt files) or hub id"
    )
    parser.add_argument("out", help="new m3_jax model directory (must not exist or be empty)")
    parser.add_argument(
        "--fresh-heads",
        action="store_true",
        help="allow a checkpoint without colbert_linear.pt/sparse_linear.pt (heads start random)",
    )
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache for hub downloads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    start = time.perf_counter()
    try:
        out = convert_checkpoint(
            args.src, args.out, fresh_heads=args.fresh_heads, cache_dir=args.cache_dir
        )
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
