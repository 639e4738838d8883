"""What tools/benchmark_encode.py and tools/benchmark_train.py share: the model geometries, their
common options, synthetic texts of chosen token counts, the machine line and matmul peak that open
a run, and the result table.

Both benchmarks start every side from identical random weights (m3_jax.tiny.random_params) in the
geometry asked for, with the tiny tokenizer trained on synthetic multi-script text.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import jax
import numpy as np
import torch

from m3_jax import config as configs
from m3_jax.flops import measure_matmul_peak
from m3_jax.tiny import synthetic_corpus

GEOMETRIES = {"tiny": configs.tiny, "base": configs.base_size, "bge-m3": configs.bge_m3}
TOKENS_PER_WORD = 5.5  # of the tiny tokenizer on synthetic text, roughly


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take: geometry, seed, the sides' precision and attention."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="m3_jax compute dtype (params stay float32); bfloat16 on accelerators",
    )
    parser.add_argument(
        "--attention",
        choices=configs.ATTENTION_IMPLS,
        default="chunked",
        help="m3_jax attention (cudnn on GPUs, splash on TPUs)",
    )
    parser.add_argument(
        "--torch-attention",
        choices=("eager", "sdpa"),
        default="sdpa",
        help="transformers attention implementation of the PyTorch side",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def model_config(args, vocab_size: int, longest: int):
    """The --geometry config with a position table for inputs of up to `longest` tokens."""
    return GEOMETRIES[args.geometry](
        vocab_size=vocab_size,
        max_position_embeddings=longest + 2,
        dtype=args.dtype,
        attention_impl=args.attention,
    )


def start_run(args) -> tuple[dict, float]:
    """Prints the machine line; (the results' header fields, the matmul peak in FLOP/s).

    The load average is printed because on a shared CPU it decides how far the absolute speeds can
    be trusted; the peak is measured in the same run so that MFU is against what this machine gives
    now, not a datasheet figure."""
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}, jax {jax.devices()[0].device_kind}"
    )
    print(f"machine: {machine}; load average {os.getloadavg()[0]:.1f} before the run")
    results = {"geometry": args.geometry, "machine": machine, "load_average": os.getloadavg()[0]}
    return results, measure_matmul_peak(dtype=args.dtype)


def texts_of_lengths(lengths, seed: int) -> list[str]:
    """Synthetic multi-script texts of about `lengths` tokens each (of the tiny tokenizer)."""
    words = " ".join(synthetic_corpus(4000, seed)).split()
    rng = np.random.default_rng(seed + 1)
    texts = []
    for length in lengths:
        n = max(1, int(length / TOKENS_PER_WORD))
        start = int(rng.integers(0, len(words) - n))
        texts.append(" ".join(words[start : start + n]))
    return texts


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> None:
    """First column left-aligned, the others right-aligned, each as wide as its widest cell."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    print(f"\n{title}")
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells))
    for note in notes:
        print(note)
