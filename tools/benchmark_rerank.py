"""Reranking throughput of m3_jax's Reranker against FlagEmbedding's FlagReranker, on the same
checkpoint and pairs, in one run.

    python tools/benchmark_rerank.py --geometry tiny
    python tools/benchmark_rerank.py --geometry base --num-pairs 512 --max-length 512
    python tools/benchmark_rerank.py --geometry bge-m3 --dtype bfloat16 --attention cudnn

Both sides load one cross-encoder directory in the PyTorch layout of
XLMRobertaForSequenceClassification, written from random weights (m3_jax.tiny.random_params) in
the geometry asked for, with the tiny tokenizer. The pairs are a short query (8-40 tokens) and a
passage whose length is drawn like a real corpus (tools/benchmark_encode.py). Each side makes one
warm-up call (m3_jax compiles its bucket programs there), then --repeats timed calls; the table
gives the fastest. FlagReranker runs in a child process with transformers 4 (tools/flag_reranker.py:
FlagEmbedding 1.4 cannot run under transformers 5); m3_jax runs here. Useful FLOP/s count each
pair's matmuls at its own length; MFU is against the matmul peak measured in the same run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import jax
import numpy as np
from bench_common import base_parser, model_config, print_table, start_run, texts_of_lengths
from benchmark_encode import corpus_lengths, warm_then_time
from flag_reranker import default_cache_root, run_flag_reranker, side_environment

from m3_jax.convert.reranker import export_reranker
from m3_jax.flops import forward_flops_per_token, mfu
from m3_jax.model import RerankerModel
from m3_jax.reranker import Reranker
from m3_jax.tiny import random_params, train_tokenizer
from m3_jax.tokenization import load_tokenizer, tokenize_pairs


def make_pairs(num_pairs: int, max_length: int, seed: int) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    queries = texts_of_lengths(rng.integers(8, 41, num_pairs), seed)
    passages = texts_of_lengths(corpus_lengths(num_pairs, max_length, seed + 1), seed + 2)
    return list(zip(queries, passages, strict=True))


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--num-pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per batch, both sides")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    results, peak = start_run(args)
    print(f"matmul peak ({args.dtype}): {peak / 1e9:.0f} GFLOP/s")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer_dir = train_tokenizer(work / "tokenizer", seed=args.seed)
        tokenizer = load_tokenizer(tokenizer_dir)
        config = model_config(args, len(tokenizer), args.max_length)
        params = random_params(config.replace(dtype="float32"), args.seed, RerankerModel)
        checkpoint = export_reranker(
            config.replace(dtype="float32"),
            params,
            work / "reranker",
            tokenizer_source=tokenizer_dir,
        )
        pairs = make_pairs(args.num_pairs, args.max_length, args.seed)
        queries, passages = [q for q, _ in pairs], [p for _, p in pairs]
        lengths = [
            len(ids)
            for ids in tokenize_pairs(
                tokenizer, queries, passages, args.max_length * 3 // 4, args.max_length
            )
        ]
        flops = sum(n * forward_flops_per_token(config, n) for n in lengths)

        flag = run_flag_reranker(
            side_environment(default_cache_root()),
            checkpoint,
            pairs,
            work / "flag.json",
            batch_size=args.batch_size,
            max_length=args.max_length,
            repeats=args.repeats,
        )
        reranker = Reranker.from_pretrained(
            checkpoint,
            dtype=args.dtype,
            attention_impl=args.attention,
            batch_size=args.batch_size,
            max_length=args.max_length,
            show_progress=False,
        )
        scores, warmup, seconds = warm_then_time(
            lambda: reranker.compute_score(pairs), args.repeats
        )

    diff = float(np.max(np.abs(np.asarray(scores) - np.asarray(flag["scores"]))))
    sides = {
        "FlagReranker (official, transformers 4, torch)": (
            flag["best_seconds"],
            flag["warmup_seconds"],
        ),
        f"m3_jax Reranker ({args.attention}, static buckets)": (seconds, warmup),
    }
    reference = flag["best_seconds"]
    rows = []
    for label, (best, first) in sides.items():
        rows.append(
            [
                label,
                f"{len(pairs) / best:.1f}",
                f"{sum(lengths) / best:.0f}",
                f"{reference / best:.2f}",
                f"{mfu(flops, best, peak):.3f}",
                f"{first:.1f}",
            ]
        )
    notes = [
        f"{len(pairs)} pairs, {sum(lengths)} tokens (mean {np.mean(lengths):.0f}, max {max(lengths)}), "
        f"geometry {args.geometry}, batch {args.batch_size}, {args.dtype}, {jax.devices()[0].platform}",
        f"max |score difference| m3_jax vs FlagReranker: {diff:.2e}",
        f"m3_jax compiled {reranker.compiled_program_count()} programs (in its warm-up call)",
    ]
    print_table(
        "Reranking throughput (fastest of the timed calls)",
        ["side", "pairs/s", "tokens/s", "ratio", "MFU", "warm-up s"],
        rows,
        notes,
    )
    results.update(
        pairs=len(pairs),
        tokens=sum(lengths),
        peak_flops_per_s=peak,
        max_score_difference=diff,
        sides={label: {"seconds": b, "warmup_seconds": w} for label, (b, w) in sides.items()},
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
