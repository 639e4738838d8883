"""Convert between BGE-M3 PyTorch directories and m3_jax model directories or training runs.

    m3-jax convert from-pytorch BAAI/bge-m3 checkpoints/bge-m3   # hub id or local directory
    m3-jax convert to-pytorch runs/demo out/bge-m3-ft            # newest checkpoint of a run
    m3-jax convert to-pytorch runs/demo out/step-600 --step 600  # a chosen step
    m3-jax convert extend-positions FacebookAI/xlm-roberta-large checkpoints/xlmr-8192 --max-length 8192

from-pytorch writes `m3_jax_config.json`, orbax `params/` and the tokenizer files, loadable with
`M3Embedder.from_pretrained(OUT)` without torch. to-pytorch writes the FlagEmbedding /
transformers / sentence-transformers layout from an m3_jax model directory, a training run
directory (`checkpoints/` inside), its `checkpoints/` or one `checkpoints/STEP`; a run's model
config and tokenizer are read from the run (`model_info/` or `export/`), or named by --config and
--tokenizer. extend-positions writes an m3_jax model directory whose position table holds
--max-length tokens, the learned rows tiled (`m3_jax.convert.positions`); from an
XLMRobertaForMaskedLM checkpoint such as FacebookAI/xlm-roberta-large it keeps the MLM head (`mlm_head/`)
for RetroMAE pre-training, and BGE-M3's colbert and sparse heads start fresh.
"""

from __future__ import annotations

import argparse
import time

from m3_jax.cli.common import add_subcommands
from m3_jax.convert.from_torch import convert_checkpoint
from m3_jax.convert.positions import extend_model_positions
from m3_jax.convert.to_torch import convert_to_pytorch


def add_from_pytorch_arguments(parser: argparse.ArgumentParser) -> None:
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


def run_from_pytorch(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = convert_checkpoint(
        args.src, args.out, fresh_heads=args.fresh_heads, cache_dir=args.cache_dir
    )
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def add_to_pytorch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="m3_jax model directory, training run, or checkpoint step dir")
    parser.add_argument("out", help="output directory (must not exist or be empty)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (None: newest)")
    parser.add_argument("--config", default=None, help="m3_jax_config.json of the run's model")
    parser.add_argument("--tokenizer", default=None, help="directory holding the tokenizer files")
    parser.add_argument(
        "--fp16-heads",
        action="store_true",
        help="write colbert_linear.pt/sparse_linear.pt in fp16, like the release (else fp32)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16"),
        help="encoder weights dtype (the release's pytorch_model.bin is float32)",
    )
    parser.add_argument(
        "--bin", action="store_true", help="also write pytorch_model.bin (torch pickle)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT if it exists and is not empty"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_to_pytorch(args: argparse.Namespace) -> int:
    start = time.perf_counter()
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
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


def add_extend_positions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", help="m3_jax model dir, training run, PyTorch XLM-R / BGE-M3 dir or hub id"
    )
    parser.add_argument("out", help="new m3_jax model directory (must not exist or be empty)")
    parser.add_argument(
        "--max-length",
        type=int,
        required=True,
        help="longest input in tokens, special tokens included (8192 for BGE-M3)",
    )


def run_extend_positions(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = extend_model_positions(args.src, args.out, args.max_length)
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0


DIRECTIONS = {
    "from-pytorch": (add_from_pytorch_arguments, run_from_pytorch, "PyTorch BGE-M3 → m3_jax"),
    "to-pytorch": (add_to_pytorch_arguments, run_to_pytorch, "m3_jax → PyTorch BGE-M3"),
    "extend-positions": (
        add_extend_positions_arguments,
        run_extend_positions,
        "a longer position table (XLM-R's 512 tokens → 8192)",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_subcommands(parser, DIRECTIONS, "DIRECTION", __doc__)


def run(args: argparse.Namespace) -> int:
    return args.run(args)
